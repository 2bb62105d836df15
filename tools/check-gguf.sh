#!/usr/bin/env bash
# Reads GGUF files with the npm package @huggingface/gguf (an independent reader): the golden files of
# tools/gguf_golden.py and the LoRA adapters comigs exports (written by comigs-tests' adapter tests), and
# compares their metadata and tensor infos with tools/gguf_expect.json.
# Usage: tools/check-gguf.sh [build dir]     (needs node, npm and network access to the npm registry)
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$src/build}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm init -y >/dev/null && npm install --silent --no-save @huggingface/gguf@0.4.6 >/dev/null)
cp "$src/tools/gguf_check.mjs" "$work/"
COMIGS_GGUF_EXPORT_DIR="$work" "$build/tests/comigs-tests" -tc="GGUF LoRA adapter*" >/dev/null
node "$work/gguf_check.mjs" --expect "$src/tools/gguf_expect.json" \
  "$src/tests/golden/gguf_types.gguf" "$src/tests/golden/gguf_align64.gguf" \
  "$work/lora_generalist.gguf" "$work/lora_specialist_f16.gguf"
