#!/usr/bin/env bash
# Installs the Debian packages comigs builds with, only those missing. Uses sudo when not root.
set -euo pipefail
packages=(cmake g++ make libeigen3-dev libxsimd-dev libomp-dev nlohmann-json3-dev libcli11-dev doctest-dev
          libbenchmark-dev libopenmpi-dev openmpi-bin libdnnl-dev zlib1g-dev)
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
[ "${#missing[@]}" -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
