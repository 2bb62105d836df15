#!/usr/bin/env python3
"""Summarises tools/run_claims.sh output (OUT/<group>-s<seed>/results.json) as docs/claims.md: the
paper's claims with what the demo measured, then the tables behind them.

    python3 tools/summarize_claims.py OUT > docs/claims.md
"""
import json, pathlib, re, statistics, sys

out = pathlib.Path(sys.argv[1])
runs = {}  # group -> seed -> results
for p in sorted(out.glob("*-s*/results.json")):
    m = re.fullmatch(r"(.*)-s(\d+)", p.parent.name)
    if m.group(1).startswith("host-only"):
        continue
    runs.setdefault(m.group(1), {})[int(m.group(2))] = json.loads(p.read_text())
meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}


def ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def rel(a, b):  # relative difference of a against b, in %
    return 100.0 * (a - b) / b


def per_seed(group_a, method_a, group_b, method_b, field="mean_test_ppl"):
    """Relative differences (%) of method_a against method_b, one per seed both groups ran."""
    a, b = runs.get(group_a, {}), runs.get(group_b, {})
    seeds = [s for s in sorted(set(a) & set(b)) if method_a in a[s]["methods"] and method_b in b[s]["methods"]]
    return seeds, [rel(a[s]["methods"][method_a][field], b[s]["methods"][method_b][field]) for s in seeds]


def pct(xs):
    return f"{statistics.mean(xs):+.2f}% (seeds: {', '.join(f'{x:+.2f}%' for x in xs)})"


def by_layer(user):  # per-layer routing of a user; "layers" is its name in results.json before 2026-12-06 21:00
    return user.get("routing_by_layer", user.get("layers", []))


def layer_mean(group, method, key, layer):
    vals = [by_layer(u)[layer][key] for r in runs.get(group, {}).values() if method in r["methods"]
            for u in r["methods"][method]["users"] if len(by_layer(u)) > layer and by_layer(u)[layer][key] is not None]
    return statistics.mean(vals) if vals else None


def verdicts():
    rows = []

    def row(claim, measured, holds):
        rows.append(f"| {claim} | {measured} | {holds} |")

    for h in ["h0.9", "h0.5", "h0"]:
        if h not in runs:
            continue
        first = next(iter(runs[h].values()))
        base = [m for m in ("local", "fedavg") if m in first["methods"]]
        if "comigs-1g1s" not in first["methods"] or len(base) < 2:
            continue
        lines, every = [], True
        for b in base:
            _, d = per_seed(h, "comigs-1g1s", h, b)
            lines.append(f"vs {b} {pct(d)}")
            every &= all(x < 0 for x in d)
        # The better of the two baselines per seed.
        seeds = sorted(runs[h])
        best = [rel(runs[h][s]["methods"]["comigs-1g1s"]["mean_test_ppl"],
                    min(runs[h][s]["methods"][b]["mean_test_ppl"] for b in base)) for s in seeds]
        lines.append(f"vs the better of the two {pct(best)}")
        hv = h[1:]
        row(f"h = {hv}: CoMiGS-1G1S beats both Local and FedAvg", "; ".join(lines),
            "yes, every seed" if every else ("within 1% of the better" if statistics.mean(best) < 1 else "no"))
    if "h0.9" in runs:
        first = next(iter(runs["h0.9"].values()))
        means = {m: statistics.mean(r["methods"][m]["mean_test_ppl"] for r in runs["h0.9"].values())
                 for m in first["methods"]}
        order = sorted(means, key=means.get)
        rank = order.index("comigs-1g1s") + 1
        gap = rel(means["comigs-1g1s"], means[order[0]])
        row("Under high heterogeneity (h = 0.9) CoMiGS-1G1S is best or near-best",
            f"rank {rank} of {len(order)} ({', '.join(f'{m} {means[m]:.3f}' for m in order)}); "
            f"{gap:+.2f}% against the best", "yes" if gap < 1.0 else "no")
    for h in ["h0.9", "h0.5", "h0"]:
        seeds, d = per_seed(h, "comigs-1g1s", h, "pfedmoe")
        if seeds:
            row(f"h = {h[1:]}: a router trained on validation data (1G1S) beats one trained on training data (pFedMoE)",
                pct(d), "yes, every seed" if all(x < 0 for x in d) else "no")
    if "h0.9" in runs:
        r = next(iter(runs["h0.9"].values()))["methods"]
        if "comigs-1g1s" in r and "fedavg" in r:
            a, b = r["comigs-1g1s"]["upload_floats_per_round"], r["fedavg"]["upload_floats_per_round"]
            row("Only generalists travel: half of FedAvg's upload", f"{a} against {b} floats per user and round",
                "yes" if 2 * a == b else "no")
    for group in sorted(g for g in runs if g.startswith("single-")):
        d = []
        for s, res in sorted(runs[group].items()):
            a = res["methods"]["local"]["users"][0]["test_ppl"]
            b = res["methods"]["comigs-1g1s"]["users"][0]["test_ppl"]
            d.append(rel(b, a))
        row(f"h = {group.split('-h')[1]}: a user with a single (generalist) expert gains from users with more "
            f"experts", f"user 0, 1 generalist among 1G1S users, against 1 local expert: {pct(d)}",
            "yes, every seed" if all(x < 0 for x in d) else "no")
    if "h0.9" in runs:
        parts, accuracy = [], []
        for layer in (0, 1):
            p = layer_mean("h0.9", "comigs-1g1s", "personal_to_specialist", layer)
            s = layer_mean("h0.9", "comigs-1g1s", "shared_to_generalist", layer)
            if p is not None and s is not None:
                accuracy.append((p + s) / 2)
                parts.append(f"layer {layer}: personal tokens to the specialist {100 * p:.0f}%, shared tokens to "
                             f"the generalist {100 * s:.0f}% (balanced accuracy {accuracy[-1]:.2f}, chance 0.5)")
        if parts:
            row("Routing is token-level and layer-dependent: shared content to the generalist, personal to the "
                "specialist (h = 0.9, 1G1S, top-1 expert, mean over users and seeds)", "; ".join(parts),
                "better than chance" if max(accuracy) > 0.55 else "no")
    row("Generalists keep low-data users from overfitting even with extra specialists", "not measured here", "-")
    return rows


def method_table(group):
    seeds = runs.get(group, {})
    if not seeds:
        return
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
    seeds, d = per_seed(group_a, method_a, group_b, method_b, field)
    if not seeds:
        return
    per = ", ".join(f"{x:+.2f}%" for x in d)
    print(f"| {label} | {statistics.mean(d):+.2f}% | {per} | {'yes' if all(x < 0 for x in d) else 'no'} |")


print("# The paper's claims against the demo's numbers\n")
print("Generated by `tools/summarize_claims.py` from the runs of `tools/run_claims.sh` (do not edit by hand:")
print("run `tools/run_claims.sh BUILD_DIR OUT_DIR` again). Every run is `comigs-demo` on the embedded corpus")
print("with default flags apart from those of its group (the commands are listed at the end), seeds 0-2,")
print("deployed protocol (each user's model after the last aggregation and download) unless noted.", end="")
if meta:
    print(f" Runs of {meta.get('date', '?')} on {meta.get('machine', '?')}, commit {meta.get('commit', '?')}.")
else:
    print()
# OUT/provenance.md, when present: where runs not made by this output's binary came from, and the evidence
# that they equal what it would give (e.g. runs kept from an earlier output after the same numbers came out).
if (out / "provenance.md").exists():
    print("\n" + (out / "provenance.md").read_text().strip())
# Runs listed in commands.txt without a results.json (cut for time, or failed): named, not hidden.
missing = []
if (out / "commands.txt").exists():
    for line in (out / "commands.txt").read_text().splitlines():
        m = re.search(r"--out (\S+)", line)
        if m and not pathlib.Path(m.group(1)).name.startswith("host-only") \
                and not (pathlib.Path(m.group(1)) / "results.json").exists():
            missing.append(pathlib.Path(m.group(1)).name)
if missing:
    print(f"\nNot run (the runs were cut to what fitted the time; their commands are listed at the end): "
          f"{', '.join(missing)}.")
print("\n## Verdicts\n")
print("| claim of the paper | measured here (relative difference of mean test perplexity; negative: CoMiGS better) | holds |")
print("|---|---|---|")
for r in verdicts():
    print(r)
print("\n## Tables")
for g in ["h0.9", "h0.5", "h0", "att-h0.9", "att-h0"]:
    method_table(g)

print("\n### Comparisons (relative difference of mean deployed test perplexity; negative = first is better)\n")
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
for variant, flag in [("recal", "--recalibrate 30"), ("target", "--generalist-target 0.8")]:
    compare(f"h0: comigs-1g1s {flag} vs fedavg", f"{variant}-h0", "comigs-1g1s", "h0", "fedavg")
    compare(f"h0.9: comigs-1g1s {flag} vs plain comigs-1g1s", f"{variant}-h0.9", "comigs-1g1s", "h0.9", "comigs-1g1s")
    compare(f"h0: comigs-1g1s {flag} vs plain comigs-1g1s", f"{variant}-h0", "comigs-1g1s", "h0", "comigs-1g1s")
    compare(f"h0.9: comigs-1g1s {flag} vs local", f"{variant}-h0.9", "comigs-1g1s", "h0.9", "local")
    compare(f"h0.9: comigs-1g1s {flag} vs fedavg", f"{variant}-h0.9", "comigs-1g1s", "h0.9", "fedavg")

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

if "h0.9" in runs:
    print("\n### Where the routers send the tokens (h = 0.9, deployed, mean over users and seeds)\n")
    print("| method | layer | gate weight to generalists | personal tokens to specialists | shared tokens to generalists |")
    print("|---|---|---|---|---|")
    for m in ("comigs-1g1s", "pfedmoe"):
        for layer in (0, 1):
            vals = [layer_mean("h0.9", m, k, layer) for k in
                    ("generalist_share", "personal_to_specialist", "shared_to_generalist")]
            if None not in vals:
                print(f"| {m} | {layer} | " + " | ".join(f"{100 * v:.1f}%" for v in vals) + " |")

cmds = out / "commands.txt"
if cmds.exists():
    print("\n## Commands\n")
    print("```")
    for line in cmds.read_text().splitlines():
        print(re.sub(r"^\S*comigs-demo", "comigs-demo", line).replace(str(out) + "/", "OUT/"))
    print("```")
