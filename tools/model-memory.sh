#!/usr/bin/env bash
# The fine-tuning memory table of docs/on-device.md: comigs-model-memory (benchmarks/model_memory.cpp) for
# GPT-2-124M, SmolLM2-135M and Llama-3.2-1B shapes with random weights in fp32 / bf16 / Q8_0 / Q4_0, one
# process each. Usage: tools/model-memory.sh [BUILD_DIR]   (default build; needs ~8 GB free for 1B fp32)
set -euo pipefail
build="${1:-build}"
prog="$build/benchmarks/comigs-model-memory"
[ -x "$prog" ] || { echo "no $prog: build the benchmarks (COMIGS_BUILD_BENCHMARKS=ON)"; exit 1; }
echo "| model | base | frozen base MB | LoRA + routers + AdamW MB | activations (8 x 128) MB | total MB | peak RSS MB |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
for host in gpt2_124m smollm2_135m llama32_1b; do
  for p in fp32 bf16 q8_0 q4_0; do
    "$prog" "$host" "$p"
  done
done
