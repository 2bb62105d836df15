#!/usr/bin/env python3
"""Summarises tools/run_claims.sh output: OUT/<group>-s<seed>/results.json -> markdown tables."""
import json, math, pathlib, re, statistics, sys

out = pathlib.Path(sys.argv[1])
runs = {}  # group -> seed -> results
for p in sorted(out.glob("*-s*/results.json")):
    m = re.fullmatch(r"(.*)-s(\d+)", p.parent.name)
    runs.setdefault(m.group(1), {})[int(m.group(2))] = json.loads(p.read_text())

def ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs: return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"

def rel(a, b):  # relative difference of a against b, in %
    return 100.0 * (a - b) / b

def method_table(group):
    seeds = runs.get(group, {})
    if not seeds: return
    first = next(iter(seeds.values()))
    print(f"\n### {group} (seeds {sorted(seeds)}; mean ± sample std over seeds)\n")
    print("| method | test ppl (deployed) | personalised | OOD | gap closed | generalist share | upload floats/round |")
    print("|---|---|---|---|---|---|---|")
    for name in first["methods"]:
        rows = [r["methods"][name] for r in seeds.values() if name in r["methods"]]
        gap = [statistics.mean([u["gap_closed"] for u in m["users"]]) for m in rows]
        gen = [statistics.mean([u["generalist_share"] for u in m["users"]]) for m in rows]
        print(f"| {name} | {ms([m['mean_test_ppl'] for m in rows])} | {ms([m['mean_test_ppl_personalised'] for m in rows])} "
              f"| {ms([m['mean_ood_ppl'] for m in rows])} | {ms(gap)} | {ms(gen)} | {rows[0]['upload_floats_per_round']} |")
    print(f"\nhost {ms([r['host_mean_ppl'] for r in seeds.values()])}, floor {ms([r['floor_mean_ppl'] for r in seeds.values()])}")

def compare(label, group_a, method_a, group_b, method_b, field="mean_test_ppl"):
    a, b = runs.get(group_a, {}), runs.get(group_b, {})
    seeds = sorted(set(a) & set(b))
    seeds = [s for s in seeds if method_a in a[s]["methods"] and method_b in b[s]["methods"]]
    if not seeds: return
    d = [rel(a[s]["methods"][method_a][field], b[s]["methods"][method_b][field]) for s in seeds]
    per = ", ".join(f"{x:+.2f}%" for x in d)
    print(f"| {label} | {statistics.mean(d):+.2f}% | {per} | {'yes' if all(x < 0 for x in d) else 'no'} |")

for g in ["h0.9", "h0.5", "h0", "att-h0.9", "att-h0"]:
    method_table(g)

print("\n### Claims (relative difference of mean deployed test perplexity; negative = first is better)\n")
print("| comparison | mean | per seed | better on every seed |")
print("|---|---|---|---|")
for h in ["h0.9", "h0.5", "h0"]:
    compare(f"{h}: comigs-1g1s vs local", h, "comigs-1g1s", h, "local")
    compare(f"{h}: comigs-1g1s vs fedavg", h, "comigs-1g1s", h, "fedavg")
    compare(f"{h}: comigs-1g1s (router on validation) vs pfedmoe (router on training)", h, "comigs-1g1s", h, "pfedmoe")
    compare(f"{h}: comigs-1g1s vs fedavg, personalised protocol", h, "comigs-1g1s", h, "fedavg", "mean_test_ppl_personalised")
for h in ["att-h0.9", "att-h0"]:
    compare(f"{h}: comigs-1g1s vs local (all with attention LoRA)", h, "comigs-1g1s", h, "local")
    compare(f"{h}: comigs-1g1s vs fedavg (all with attention LoRA)", h, "comigs-1g1s", h, "fedavg")
for variant in ["recal", "target"]:
    compare(f"h0: comigs-1g1s {variant} vs fedavg", f"{variant}-h0", "comigs-1g1s", "h0", "fedavg")
    compare(f"h0.9: comigs-1g1s {variant} vs plain comigs-1g1s", f"{variant}-h0.9", "comigs-1g1s", "h0.9", "comigs-1g1s")
    compare(f"h0: comigs-1g1s {variant} vs plain comigs-1g1s", f"{variant}-h0", "comigs-1g1s", "h0", "comigs-1g1s")
    compare(f"h0.9: comigs-1g1s {variant} vs local", f"{variant}-h0.9", "comigs-1g1s", "h0.9", "local")
    compare(f"h0.9: comigs-1g1s {variant} vs fedavg", f"{variant}-h0.9", "comigs-1g1s", "h0.9", "fedavg")

for group in sorted(g for g in runs if g.startswith("single-")):
    single = runs[group]
    h = group.split("-h")[1]
    print(f"\n### A user with a single expert (--experts 1,2,2,2, h = {h}): user 0's deployed test perplexity\n")
    print("| seed | local (1 expert) | comigs-1g1s (1 generalist) | difference |")
    print("|---|---|---|---|")
    d = []
    for s, r in sorted(single.items()):
        a = r["methods"]["local"]["users"][0]["test_ppl"]
        b = r["methods"]["comigs-1g1s"]["users"][0]["test_ppl"]
        d.append(rel(b, a))
        print(f"| {s} | {a:.3f} | {b:.3f} | {d[-1]:+.2f}% |")
    print(f"| mean | | | {statistics.mean(d):+.2f}% |")
