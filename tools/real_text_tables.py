#!/usr/bin/env python3
"""Tables of docs/real-text.md from the runs of tools/real_text_runs.py.

    tools/real_text_tables.py OUT_DIR [PLAN...]   (markdown on stdout)

Reads OUT_DIR/<plan>/<regime>/<variant>/s<seed>/results.json. Perplexities are means over users of the
deployed model; "dev" is the tuning split (choices are read off it), "test" the reported one. Each
table says which seeds it uses and which split.
"""
import json
import math
import pathlib
import statistics
import sys
from collections import defaultdict

REGIME_ORDER = ["emb-h0.9", "emb-h0.5", "emb-h0", "ml-3000", "ml-6000", "ml-12000", "ml-25000", "ml-50000", "ml-all",
                "dom-3000", "dom-6000", "dom-12000", "dom-25000", "dom-50000", "dom-all"]


def regime_key(r):
    return (REGIME_ORDER.index(r) if r in REGIME_ORDER else len(REGIME_ORDER), r)


def load(out):
    """runs[plan][regime][variant][seed] = results.json"""
    runs = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for p in sorted(pathlib.Path(out).glob("*/*/*/s*/results.json")):
        seed_dir = p.parent
        variant, regime, plan = seed_dir.parent.name, seed_dir.parent.parent.name, seed_dir.parent.parent.parent.name
        runs[plan][regime][variant][int(seed_dir.name[1:])] = json.loads(p.read_text())
    return runs


def gmean(xs):
    return math.exp(statistics.mean(math.log(x) for x in xs))


def fmt(xs, digits=3):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def pct(a, b):
    return 100.0 * (a - b) / b


def metric(res, method, split):
    m = res["methods"].get(method)
    if m is None:
        return None
    return m["mean_dev_ppl"] if split == "dev" else m["mean_test_ppl"]


def baseline_lrs(runs, plan="baselines", split="dev"):
    """Per regime and baseline, the learning-rate variant with the best mean dev perplexity."""
    best = {}
    for regime, variants in runs.get(plan, {}).items():
        for method in ["local", "fedavg"]:
            scores = {}
            for v, seeds in variants.items():
                vals = [metric(r, method, split) for r in seeds.values()]
                vals = [x for x in vals if x is not None]
                if vals and v.startswith("lr"):
                    scores[v] = gmean(vals)
            if scores:
                best[(regime, method)] = min(scores, key=scores.get)
    return best


def table_baselines(runs, plan="baselines"):
    variants_all = sorted({v for r in runs.get(plan, {}).values() for v in r})
    lr_variants = [v for v in variants_all if v.startswith("lr")]
    print(f"\n### Baselines and their learning rates ({plan}; dev split, mean over tuning seeds)\n")
    head = ["regime"] + [f"local {v}" for v in lr_variants] + [f"fedavg {v}" for v in lr_variants] + \
        ["comigs-1g1s", "pfedmoe", "comigs-2s", "comigs-2g", "host"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for regime in sorted(runs.get(plan, {}), key=regime_key):
        v = runs[plan][regime]
        row = [regime]
        for method in ["local", "fedavg"]:
            for lv in lr_variants:
                row.append(fmt([metric(r, method, "dev") for r in v.get(lv, {}).values()]))
        for method in ["comigs-1g1s", "pfedmoe", "comigs-2s", "comigs-2g"]:
            row.append(fmt([metric(r, method, "dev") for r in v.get("reference", {}).values()]))
        hosts = [r["host_mean_ppl"] for vv in v.values() for r in vv.values()]
        row.append(f"{statistics.mean(hosts):.3f}" if hosts else "-")
        print("| " + " | ".join(row) + " |")


def table_variants(runs, plan, reference_runs, method="comigs-1g1s", split="dev"):
    """Relative change of each variant against the reference schedule, per regime (mean over seeds of
    the per-seed relative difference), and the generalist's gate weight."""
    regimes = sorted(runs.get(plan, {}), key=regime_key)
    variants = sorted({v for r in regimes for v in runs[plan][r]})
    print(f"\n### {plan}: {method}, change of mean {split} perplexity against the reference schedule "
          "(per-seed relative difference, mean over tuning seeds; negative = better)\n")
    print("| variant | " + " | ".join(regimes) + " | mean |")
    print("|---|" + "---|" * (len(regimes) + 1))
    for v in variants:
        row, all_d = [v], []
        for regime in regimes:
            ref = reference_runs.get(regime, {})
            seeds = runs[plan][regime].get(v, {})
            d = [pct(metric(seeds[s], method, split), metric(ref[s], method, split))
                 for s in seeds if s in ref and metric(seeds[s], method, split) and metric(ref[s], method, split)]
            all_d += [statistics.mean(d)] if d else []
            gen = [seeds[s]["methods"][method]["mean_generalist_share"] for s in seeds if method in seeds[s]["methods"]]
            row.append(f"{statistics.mean(d):+.1f}% ({statistics.mean(gen):.2f})" if d else "-")
        row.append(f"{statistics.mean(all_d):+.2f}%" if all_d else "-")
        print("| " + " | ".join(row) + " |")
    print("\nIn brackets: the generalist's mean gate weight on test tokens.")


def main():
    out = sys.argv[1]
    plans = sys.argv[2:] or ["baselines", "router"]
    runs = load(out)
    if "baselines" in plans:
        table_baselines(runs)
        best = baseline_lrs(runs)
        print("\nBest learning rate per regime (dev): " +
              ", ".join(f"{r} {m} {v}" for (r, m), v in sorted(best.items(), key=lambda x: regime_key(x[0][0]))))
    ref = {r: v.get("reference", {}) for r, v in runs.get("baselines", {}).items()}
    for plan in plans:
        if plan != "baselines":
            table_variants(runs, plan, ref)


if __name__ == "__main__":
    main()
