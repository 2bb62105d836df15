#!/usr/bin/env bash
# Cross-builds the library, the test suite and the examples for 64-bit ARM (aarch64) with Debian's cross
# compiler and runs the tests under qemu-user (CI runs this; see docs/on-device.md).
# Usage: tools/test-aarch64.sh            environment: COMIGS_ARM_BUILD_DIR (default build-aarch64),
#                                                      COMIGS_ARM_CMAKE_ARGS (extra configure arguments)
# What runs there by default (CI's time budget): the test files of every kernel, layer, file format,
# host, tokenizer and the trainer (COMIGS_ARM_TEST_FILTER below). COMIGS_ARM_TEST_FILTER=all builds and
# runs the whole suite and the examples' ctest cases (the demo, MPI-free runners, golden layer files, the
# tour) instead. Always left out: the benchmarks (Google Benchmark is a compiled x86 library here), the
# MPI target (Open MPI likewise), oneDNN (x86 only: the fp32 and bf16 paths take Eigen and comigs' own
# kernels), and the consumer-project tests (they configure CMake projects with the build machine's
# compiler). Left out by default: test_demo*, the distributed runners and communicator, run
# checkpoints and stop requests, uploads, strategies, the profiler (none has a kernel of its own).
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${COMIGS_ARM_BUILD_DIR:-$src/build-aarch64}"
start=$SECONDS
# zlib (the demo's gzip reader) for the target: Debian's arm64 package (multiarch), linked statically so
# that qemu needs no target libraries beyond the cross toolchain's.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
fi
bash "$src/tools/install-deps.sh" g++-aarch64-linux-gnu qemu-user zlib1g-dev:arm64
filter="${COMIGS_ARM_TEST_FILTER-kernels|lora|router|mixture|frozen|quant|view|params|optim|train|random|error|safetensors|peft|gguf|checkpoint|layer_file|mapped_file|adapter_file|hf_model|gpt2|llama|lm_head|generate|aggregate|unicode|byte_level|normalizer|pretokenizer|bpe_tokenizer}"
subset=()
targets=()
if [ "$filter" != all ]; then
  subset=(-DCOMIGS_TEST_FILTER="$filter" -DCOMIGS_BUILD_EXAMPLES=OFF)
  targets=(--target comigs-tests)
fi
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
# shellcheck disable=SC2086
cmake -S "$src" -B "$build" -DCMAKE_TOOLCHAIN_FILE="$src/cmake/toolchain-aarch64-linux-gnu.cmake" \
  -DCOMIGS_NATIVE=OFF -DCOMIGS_USE_ONEDNN=OFF -DCOMIGS_BUILD_MPI=OFF -DCOMIGS_BUILD_BENCHMARKS=OFF \
  -DCOMIGS_INSTALL=OFF -DZLIB_LIBRARY=/usr/lib/aarch64-linux-gnu/libz.a -DZLIB_INCLUDE_DIR=/usr/include \
  "${launcher[@]}" "${subset[@]}" ${COMIGS_ARM_CMAKE_ARGS:-}
cmake --build "$build" -j2 "${targets[@]}"
echo "== aarch64 build: $((SECONDS - start)) s"
aarch64-linux-gnu-readelf -h "$build/tests/comigs-tests" | grep -q "AArch64" || { echo "comigs-tests is not an aarch64 program"; exit 1; }
OMP_NUM_THREADS=2 ctest --test-dir "$build" -j2 --output-on-failure -E '^consumer-'
echo "== aarch64 tests under qemu done in $((SECONDS - start)) s"
