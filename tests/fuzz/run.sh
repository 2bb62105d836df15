#!/usr/bin/env bash
# Builds the libFuzzer targets with clang and runs each for a bounded time: the safetensors loader for
# [seconds] (default 60), the GGUF reader for half of that, the two tokenizer targets for
# COMIGS_FUZZ_TOKENIZER_SECONDS each (default 30; fuzz_bpe_roundtrip reads the tokenizer files
# tools/install-deps.sh installs), the model-folder config and index reader for a quarter of [seconds],
# the run-checkpoint readers for a third of [seconds].
# Usage: tests/fuzz/run.sh [seconds]        environment: CXX (default clang++), COMIGS_FUZZ_BUILD_DIR
# A finding makes this script fail; the crashing input is kept in <build dir>/fuzz-artifacts/.
set -euo pipefail

seconds="${1:-60}"
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${COMIGS_FUZZ_BUILD_DIR:-$src/build-fuzz}"

CXX="${CXX:-clang++}" cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCOMIGS_BUILD_FUZZERS=ON -DCOMIGS_BUILD_TESTS=ON -DCOMIGS_BUILD_EXAMPLES=OFF -DCOMIGS_BUILD_BENCHMARKS=OFF \
  -DCOMIGS_INSTALL=OFF -DCOMIGS_NATIVE=OFF
cmake --build "$build" --target fuzz_safetensors fuzz_tokenizer_json fuzz_bpe_roundtrip fuzz_gguf fuzz_text_extract \
  fuzz_hf_config fuzz_run_checkpoint -j2

# New inputs go to a scratch directory, so the committed seed corpus stays as it is.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$build/fuzz-artifacts"
"$build/tests/fuzz/fuzz_safetensors" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
  -dict="$src/tests/fuzz/safetensors.dict" -artifact_prefix="$build/fuzz-artifacts/" -print_final_stats=1 \
  "$work" "$src/tests/fuzz/corpus"

tok_seconds="${COMIGS_FUZZ_TOKENIZER_SECONDS:-30}"
"$build/tests/fuzz/fuzz_tokenizer_json" -max_total_time="$tok_seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
  -dict="$src/tests/fuzz/tokenizer_json.dict" -artifact_prefix="$build/fuzz-artifacts/" -print_final_stats=1 \
  "$work" "$src/tests/fuzz/corpus_tokenizer_json"
rm -rf "${work:?}"/*
"$build/tests/fuzz/fuzz_bpe_roundtrip" -max_total_time="$tok_seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
  -artifact_prefix="$build/fuzz-artifacts/" -print_final_stats=1 "$work" "$src/tests/fuzz/corpus_bpe_roundtrip"
mkdir -p "$work/gguf"
"$build/tests/fuzz/fuzz_gguf" -max_total_time="$(( (seconds + 1) / 2 ))" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
  -artifact_prefix="$build/fuzz-artifacts/gguf-" -print_final_stats=1 "$work/gguf" "$src/tests/fuzz/gguf_corpus"
# The demo's text extractors: half the time (they are small and fast).
mkdir -p "$work/text"
"$build/tests/fuzz/fuzz_text_extract" -max_total_time="$(( (seconds + 1) / 2 ))" -timeout=10 -rss_limit_mb=2048 \
  -max_len=4096 -dict="$src/tests/fuzz/text_extract.dict" -artifact_prefix="$build/fuzz-artifacts/" \
  -print_final_stats=1 "$work/text" "$src/tests/fuzz/corpus_text"
# Model folders' config.json and index (a quarter of the time: a small grammar).
mkdir -p "$work/hf"
"$build/tests/fuzz/fuzz_hf_config" -max_total_time="$(( (seconds + 3) / 4 ))" -timeout=10 -rss_limit_mb=2048 \
  -max_len=4096 -artifact_prefix="$build/fuzz-artifacts/" -print_final_stats=1 "$work/hf" "$src/tests/fuzz/corpus_hf"
mkdir -p "$work/run_checkpoint"
"$build/tests/fuzz/fuzz_run_checkpoint" -max_total_time="$((seconds / 3))" -timeout=10 -rss_limit_mb=2048 \
  -max_len=4096 -artifact_prefix="$build/fuzz-artifacts/" -print_final_stats=1 \
  "$work/run_checkpoint" "$src/tests/fuzz/corpus_run_checkpoint"
