#!/usr/bin/env bash
# Builds the libFuzzer targets with clang and runs each for a bounded time: the safetensors loader for
# [seconds] (default 60), the run-checkpoint readers for a third of that.
# Usage: tests/fuzz/run.sh [seconds]        environment: CXX (default clang++), COMIGS_FUZZ_BUILD_DIR
# A finding makes this script fail; the crashing input is kept in <build dir>/fuzz-artifacts/.
set -euo pipefail

seconds="${1:-60}"
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${COMIGS_FUZZ_BUILD_DIR:-$src/build-fuzz}"

CXX="${CXX:-clang++}" cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCOMIGS_BUILD_FUZZERS=ON -DCOMIGS_BUILD_TESTS=ON -DCOMIGS_BUILD_EXAMPLES=OFF -DCOMIGS_BUILD_BENCHMARKS=OFF \
  -DCOMIGS_INSTALL=OFF -DCOMIGS_NATIVE=OFF
cmake --build "$build" --target fuzz_safetensors fuzz_run_checkpoint -j2

# New inputs go to a scratch directory, so the committed seed corpus stays as it is.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$build/fuzz-artifacts"
"$build/tests/fuzz/fuzz_safetensors" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
  -dict="$src/tests/fuzz/safetensors.dict" -artifact_prefix="$build/fuzz-artifacts/" -print_final_stats=1 \
  "$work" "$src/tests/fuzz/corpus"

mkdir -p "$work/run_checkpoint"
"$build/tests/fuzz/fuzz_run_checkpoint" -max_total_time="$((seconds / 3))" -timeout=10 -rss_limit_mb=2048 \
  -max_len=4096 -artifact_prefix="$build/fuzz-artifacts/" -print_final_stats=1 \
  "$work/run_checkpoint" "$src/tests/fuzz/corpus_run_checkpoint"
