#!/usr/bin/env bash
# Builds the libFuzzer targets with clang and runs each for a bounded time: the safetensors loader for
# [seconds] (default 60), the GGUF reader for half of that, the two tokenizer targets for
# COMIGS_FUZZ_TOKENIZER_SECONDS each (default 30; fuzz_bpe_roundtrip reads the tokenizer files
# tools/install-deps.sh installs), the model-folder config and index reader for a quarter of [seconds],
# the run-checkpoint readers for a third of [seconds].
# Usage: tests/fuzz/run.sh [seconds]        environment: CXX (default clang++), COMIGS_FUZZ_BUILD_DIR
# A finding makes this script fail; the crashing input is kept in <build dir>/fuzz-artifacts/.
# The targets run in two lanes side by side (COMIGS_FUZZ_JOBS=1: one after the other), each for its own
# time: one libFuzzer process is one thread, so on CI's 2 cores the stage takes the longer lane's time
# (110 s of fuzzing at the defaults) instead of the sum (215 s).
set -euo pipefail

seconds="${1:-60}"
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${COMIGS_FUZZ_BUILD_DIR:-$src/build-fuzz}"

# -O1 and line tables only (libFuzzer's recommended build flags): fuzz_gguf compiles in 30 instead of
# 44 CPU s at -O2 -g, and a finding's stack still names file and line.
CXX="${CXX:-clang++}" cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only -DNDEBUG" \
  -DCOMIGS_BUILD_FUZZERS=ON -DCOMIGS_BUILD_TESTS=ON -DCOMIGS_BUILD_EXAMPLES=OFF -DCOMIGS_BUILD_BENCHMARKS=OFF \
  -DCOMIGS_INSTALL=OFF -DCOMIGS_NATIVE=OFF
cmake --build "$build" --target fuzz_safetensors fuzz_tokenizer_json fuzz_bpe_roundtrip fuzz_gguf fuzz_text_extract \
  fuzz_hf_config fuzz_run_checkpoint -j2

# New inputs go to a scratch directory per target, so the committed seed corpora stay as they are.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$build/fuzz-artifacts"
# fuzz <target> <seconds> <seed corpus> <libFuzzer options...>: new inputs go to the first corpus
# directory, the scratch one.
fuzz() {
  local target="$1" time="$2" seeds="$3"
  shift 3
  mkdir -p "$work/$target"
  "$build/tests/fuzz/$target" -max_total_time="$time" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$build/fuzz-artifacts/$target-" -print_final_stats=1 "$@" "$work/$target" "$seeds"
}
tok_seconds="${COMIGS_FUZZ_TOKENIZER_SECONDS:-30}"
lane_a() {
  fuzz fuzz_safetensors "$seconds" "$src/tests/fuzz/corpus" -max_len=4096 -dict="$src/tests/fuzz/safetensors.dict"
  # The GGUF reader and the model readers behind it: half the time.
  fuzz fuzz_gguf "$(( (seconds + 1) / 2 ))" "$src/tests/fuzz/gguf_corpus" -max_len=8192
  # Model folders' config.json and index (a quarter of the time: a small grammar).
  fuzz fuzz_hf_config "$(( (seconds + 3) / 4 ))" "$src/tests/fuzz/corpus_hf" -max_len=4096
}
lane_b() {
  fuzz fuzz_tokenizer_json "$tok_seconds" "$src/tests/fuzz/corpus_tokenizer_json" -max_len=8192 \
    -dict="$src/tests/fuzz/tokenizer_json.dict"
  fuzz fuzz_bpe_roundtrip "$tok_seconds" "$src/tests/fuzz/corpus_bpe_roundtrip" -max_len=4096
  # The demo's text extractors: half the time (they are small and fast).
  fuzz fuzz_text_extract "$(( (seconds + 1) / 2 ))" "$src/tests/fuzz/corpus_text" -max_len=4096 \
    -dict="$src/tests/fuzz/text_extract.dict"
  fuzz fuzz_run_checkpoint "$((seconds / 3))" "$src/tests/fuzz/corpus_run_checkpoint" -max_len=4096
}
if [ "${COMIGS_FUZZ_JOBS:-2}" -le 1 ]; then
  lane_a
  lane_b
  exit 0
fi
# Each lane's output goes to its own log (printed when both are done), so the two do not interleave.
(lane_a) >"$work/lane_a.log" 2>&1 &
pid_a=$!
(lane_b) >"$work/lane_b.log" 2>&1 &
pid_b=$!
status=0
wait "$pid_a" || status=1
wait "$pid_b" || status=1
cat "$work/lane_a.log" "$work/lane_b.log"
[ "$status" -eq 0 ] || { echo "tests/fuzz/run.sh: a fuzz target failed (input kept in $build/fuzz-artifacts/)"; exit 1; }
