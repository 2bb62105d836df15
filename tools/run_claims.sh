#!/usr/bin/env bash
# Runs comigs-demo over 3 seeds for the paper's claims and writes docs/claims.md from them
# (tools/summarize_claims.py).
#   tools/run_claims.sh BUILD_DIR OUT_DIR [JOBS]
# Every run is one comigs-demo command (all listed in OUT_DIR/commands.txt); a run whose results.json
# exists is skipped, so the script resumes. Hosts are pretrained once per seed and cached in
# OUT_DIR/host-s<seed>.safetensors (the base source depends on the seed only, not on h).
set -euo pipefail
build=${1:?build dir}; out=${2:?output dir}; jobs=${3:-2}
demo="$build/examples/comigs-demo"
mkdir -p "$out"
seeds="0 1 2"
all=local,fedavg,comigs-2g,comigs-2s,comigs-1g1s,pfedmoe,pcl
core=local,fedavg,comigs-1g1s,pfedmoe

cmds=()
add() {  # name, seed, flags...
  local name=$1 seed=$2; shift 2
  local cmd="$demo --quiet --seed $seed --host-cache $out/host-s$seed.safetensors --out $out/$name-s$seed $*"
  echo "$cmd" >> "$out/commands.txt"
  [ -f "$out/$name-s$seed/results.json" ] || cmds+=("$cmd")  # done: skip (an interrupted run is redone)
}
run() { [ ${#cmds[@]} -eq 0 ] || printf '%s\n' "${cmds[@]}" | xargs -P "$jobs" -I{} sh -c '{} > /dev/null'; cmds=(); }
: > "$out/commands.txt"
# Date, machine and commit recorded when the runs start (the worktree may move on while they run).
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$out/meta.json" ] || printf '{"date": "%s", "machine": "%s, %s CPUs", "commit": "%s"}\n' "$(date +%F)" \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" "$(nproc)" \
  "$(git -C "$here" describe --always --dirty 2>/dev/null || echo unknown)" > "$out/meta.json"
# Hosts first (one per seed, a one-step run), so that the runs after only reuse them.
for s in $seeds; do
  [ -f "$out/host-s$s.safetensors" ] || \
    cmds+=("$demo --quiet --seed $s --host-cache $out/host-s$s.safetensors --out $out/host-only-s$s --methods local --rounds 1 --local-steps 1")
done
run
# In order of priority (the machine this was measured on was shared and slow).
for s in $seeds; do add h0.9 "$s" --heterogeneity 0.9 --methods $all; done
for s in $seeds; do add h0.5 "$s" --heterogeneity 0.5 --methods $core; done
for s in $seeds; do add h0 "$s" --heterogeneity 0 --methods $core; done
# Candidates for the h = 0 gap, applied identically at every h (no special case): router-only
# recalibration after the final download, shared rank-8 attention LoRA for every method (as the
# reference), a higher generalist target share in the balancing loss.
for s in $seeds; do add recal-h0 "$s" --heterogeneity 0 --methods comigs-1g1s --recalibrate 30; done
# A user with a single expert (user 0) among users with two.
for s in $seeds; do add single-h0.9 "$s" --heterogeneity 0.9 --experts 1,2,2,2 --methods local,comigs-1g1s; done
for s in $seeds; do add single-h0.5 "$s" --heterogeneity 0.5 --experts 1,2,2,2 --methods local,comigs-1g1s; done
for s in $seeds; do add single-h0 "$s" --heterogeneity 0 --experts 1,2,2,2 --methods local,comigs-1g1s; done
for s in $seeds; do add att-h0 "$s" --heterogeneity 0 --methods fedavg,comigs-1g1s --attention-lora 8; done
for s in $seeds; do add recal-h0.9 "$s" --heterogeneity 0.9 --methods comigs-1g1s --recalibrate 30; done
for s in $seeds; do add att-h0.9 "$s" --heterogeneity 0.9 --methods local,fedavg,comigs-1g1s --attention-lora 8; done
for s in $seeds; do add target-h0 "$s" --heterogeneity 0 --methods comigs-1g1s --generalist-target 0.8; done
for s in $seeds; do add target-h0.9 "$s" --heterogeneity 0.9 --methods comigs-1g1s --generalist-target 0.8; done
run
python3 "$here/summarize_claims.py" "$out" > "$out/claims.md"
cp "$out/claims.md" "$here/../docs/claims.md"
echo "wrote $out/claims.md and docs/claims.md"
