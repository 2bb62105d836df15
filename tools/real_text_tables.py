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


def mean_change(xs, ys):
    """The mean over seeds of the per-seed relative difference of xs against ys (%)."""
    return statistics.mean(pct(x, y) for x, y in zip(xs, ys))


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


def run_method(res, default="comigs-1g1s"):
    """The method with a router of a single-method variant run (comigs-2g for 2G1S), else the default."""
    ms = [m for m in res["methods"] if m.startswith("comigs")]
    return ms[0] if len(ms) == 1 else default


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
            d = [pct(metric(seeds[s], run_method(seeds[s], method), split), metric(ref[s], method, split))
                 for s in seeds if s in ref and metric(seeds[s], run_method(seeds[s], method), split)
                 and metric(ref[s], method, split)]
            all_d += [statistics.mean(d)] if d else []
            gen = [seeds[s]["methods"][run_method(seeds[s], method)]["mean_generalist_share"] for s in seeds
                   if run_method(seeds[s], method) in seeds[s]["methods"]]
            row.append(f"{statistics.mean(d):+.1f}% ({statistics.mean(gen):.2f})" if d else "-")
        row.append(f"{statistics.mean(all_d):+.2f}%" if all_d else "-")
        print("| " + " | ".join(row) + " |")
    print("\nIn brackets: the generalist's mean gate weight on test tokens.")


def table_capacity(runs, split="dev"):
    """CoMiGS with more experts or rank against the baselines at their own capacity (2 experts, rank 8;
    learning rate: the best of the baselines plan's dev grid) and at CoMiGS' (capacity-base: 3 experts,
    or rank 16)."""
    cap, base, cbase = runs.get("capacity", {}), runs.get("baselines", {}), runs.get("capacity-base", {})
    best = baseline_lrs(runs)
    comigs = [("1G2S", "1g2s-top3", "experts3"), ("2G1S", "2g1s-top3", "experts3"), ("1G1S rank 16", "rank16", "rank16")]
    extra = [("3 experts", "experts3"), ("rank 16", "rank16")]
    print(f"\n### Capacity: mean {split} perplexity (tuning seeds), and each CoMiGS variant against the better "
          "baseline at the usual capacity (2 experts, rank 8) and at its own\n")
    head = ["regime", "Local", "FedAvg"] + [f"{m} {c}" for c, _ in extra for m in ("Local", "FedAvg")] + \
        ["CoMiGS-1G1S"] + [c for c, _, _ in comigs] + [f"{c} vs better ({w})" for c, _, _ in comigs
                                                       for w in ("usual", "same capacity")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for regime in sorted(cap, key=regime_key):
        b, cb = base.get(regime, {}), cbase.get(regime, {})
        per = {}  # column -> {seed: ppl}
        for m, col in (("local", "Local"), ("fedavg", "FedAvg")):
            v = b.get(best.get((regime, m), ""), {})
            per[col] = {s: metric(r, m, split) for s, r in v.items()}
            for c, prefix in extra:
                vv = next((x for name, x in cb.items() if name.startswith(f"{prefix}-{m}")), {})
                per[f"{col} {c}"] = {s: metric(r, m, split) for s, r in vv.items()}
        per["CoMiGS-1G1S"] = {s: metric(r, "comigs-1g1s", split) for s, r in b.get("reference", {}).items()}
        for col, v, _ in comigs:
            per[col] = {s: metric(r, run_method(r), split) for s, r in cap[regime].get(v, {}).items()}
        row = [regime] + [fmt(list(per[c].values())) for c in head[1:len(head) - 2 * len(comigs)]]
        for col, _, prefix in comigs:
            for suffix in ("", " " + dict((p, c) for c, p in extra)[prefix]):
                # the better of the baselines measured at that capacity (only the better one at the usual
                # capacity was run at rank 16: Local on all of a text and at h = 0.9, FedAvg at h = 0)
                loc, fed = per["Local" + suffix], per["FedAvg" + suffix]
                seeds = [s for s in per[col] if s in loc or s in fed]
                d = [pct(per[col][s], min(x[s] for x in (loc, fed) if s in x)) for s in seeds]
                row.append(f"{statistics.mean(d):+.1f}%" if d else "-")
        print("| " + " | ".join(row) + " |")
    print("\nBaselines at the usual capacity use the learning rate that won their dev grid (FedAvg at h = 0.9: "
          "with --keep-best); at CoMiGS' capacity Local uses 1e-2 on all of a text and 3e-3 otherwise, FedAvg 1e-2.")


def table_val(runs, split="dev"):
    """A larger validation set. Another validation size deals other chunks to the dev and test splits, so
    each CoMiGS variant is compared with Local at the same sizes: the change of its ratio to Local."""
    val, base = runs.get("val", {}), runs.get("baselines", {})
    cap = runs.get("capacity", {})
    print(f"\n### Validation size: CoMiGS-1G1S against Local at the same split sizes ({split} split, tuning seeds)\n")
    print("| regime | variant | Local (val 3000) | CoMiGS (val 3000) | vs Local | Local (val 30000) | CoMiGS (val 30000) "
          "| vs Local | change |")
    print("|---|---|---|---|---|---|---|---|---|")
    for regime in sorted(val, key=regime_key):
        loc3 = base.get(regime, {}).get("lr1e-2", {})
        loc30 = val[regime].get("local-val30000", {})
        # the same CoMiGS at the usual validation size
        at3000 = {"val30000": base.get(regime, {}).get("reference", {}),
                  "r16-val30000": cap.get(regime, {}).get("rank16", {})}
        for v, com30 in sorted(val[regime].items()):
            com3 = at3000.get(v)
            if com3 is None:
                continue
            seeds = sorted(set(loc3) & set(com3) & set(loc30) & set(com30))
            if not seeds:
                continue
            m = lambda runs_, meth: [metric(runs_[s], meth, split) for s in seeds]
            d3 = [pct(c, l) for c, l in zip(m(com3, "comigs-1g1s"), m(loc3, "local"))]
            d30 = [pct(c, l) for c, l in zip(m(com30, "comigs-1g1s"), m(loc30, "local"))]
            print(f"| {regime} | {v} | {fmt(m(loc3, 'local'))} | {fmt(m(com3, 'comigs-1g1s'))} | "
                  f"{statistics.mean(d3):+.1f}% | {fmt(m(loc30, 'local'))} | {fmt(m(com30, 'comigs-1g1s'))} | "
                  f"{statistics.mean(d30):+.1f}% | {statistics.mean(d30) - statistics.mean(d3):+.1f} points |")


def table_valshare(runs, split="dev"):
    """A validation set that is a share of each user's training text (--val-tokens 50%) against 3000 and
    30000 validation tokens: CoMiGS-1G1S against Local at the same split sizes (another validation size
    deals other chunks to dev and test); and at 6000 training tokens, where 50% is 3000, the same run."""
    vs, base, val = runs.get("valshare", {}), runs.get("baselines", {}), runs.get("val", {})
    print(f"\n### Validation as a share of the training text: CoMiGS-1G1S against Local at the same split sizes "
          f"({split} split, tuning seeds)\n")
    print("| regime | validation per user | Local | CoMiGS-1G1S | CoMiGS vs Local (per seed) | generalist weight |")
    print("|---|---|---|---|---|---|")
    for regime in sorted(vs, key=regime_key):
        if not regime.endswith("-all"):
            continue
        sizes = [("3000", base.get(regime, {}).get("lr1e-2", {}), base.get(regime, {}).get("reference", {})),
                 ("30000", val.get(regime, {}).get("local-val30000", {}), val.get(regime, {}).get("val30000", {})),
                 ("50% of training", vs[regime].get("local-val50pct", {}), vs[regime].get("val50pct", {}))]
        for name, loc, com in sizes:
            seeds = sorted(set(loc) & set(com))
            if not seeds:
                continue
            lo = [metric(loc[s], "local", split) for s in seeds]
            co = [metric(com[s], "comigs-1g1s", split) for s in seeds]
            d = [pct(c, l) for c, l in zip(co, lo)]
            gen = statistics.mean(com[s]["methods"]["comigs-1g1s"]["mean_generalist_share"] for s in seeds)
            if name.startswith("50%"):
                n = statistics.mean(statistics.mean(com[s]["config"]["validation_tokens"]) for s in seeds)
                name += f" (~{n / 1000:.0f}k)"
            print(f"| {regime} | {name} | {fmt(lo)} | {fmt(co)} | {statistics.mean(d):+.1f}% "
                  f"({', '.join(f'{x:+.1f}%' for x in d)}) | {gen:.2f} |")
    same = []
    for regime in sorted(vs, key=regime_key):
        ref, v50 = vs[regime].get("reference", {}), vs[regime].get("val50pct", {})
        for s in sorted(set(ref) & set(v50)):
            a, b = ref[s]["methods"]["comigs-1g1s"], v50[s]["methods"]["comigs-1g1s"]
            same.append(f"{regime} seed {s}: dev {a['mean_dev_ppl']:.6f} / {b['mean_dev_ppl']:.6f}, test "
                        f"{a['mean_test_ppl']:.6f} / {b['mean_test_ppl']:.6f} (validation "
                        f"{ref[s]['config']['validation_tokens'][0]} / {v50[s]['config']['validation_tokens'][0]})")
    if same:
        print("\n6000 training tokens, 3000 validation tokens against 50%: " + "; ".join(same) + ".")


def table_valshare_scarce(runs, split="dev"):
    """--val-tokens 50% at 3000 and 12000 training tokens (1500 and 6000 validation tokens) against 3000
    validation tokens: CoMiGS-1G1S against Local (lr 3e-3) at the same split sizes."""
    vs = runs.get("valshare-scarce", {})
    if not vs:
        return
    print(f"\n### Validation as a share of scarce training text ({split} split, tuning seeds)\n")
    print("| regime | Local (val 3000) | CoMiGS (val 3000) | vs Local | Local (val 50%) | CoMiGS (val 50%) | vs Local "
          "| change | generalist weight (3000 / 50%) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for regime in sorted(vs, key=regime_key):
        v = vs[regime]
        l3, c3, l5, c5 = (v.get(k, {}) for k in ("local-lr3e-3", "reference", "local-lr3e-3-val50pct", "reference-val50pct"))
        seeds = sorted(set(l3) & set(c3) & set(l5) & set(c5))
        if not seeds:
            continue
        m = lambda r, meth: [metric(r[s], meth, split) for s in seeds]
        d3 = mean_change(m(c3, "comigs-1g1s"), m(l3, "local"))
        d5 = mean_change(m(c5, "comigs-1g1s"), m(l5, "local"))
        g = lambda r: statistics.mean(r[s]["methods"]["comigs-1g1s"]["mean_generalist_share"] for s in seeds)
        n5 = c5[seeds[0]]["config"]["validation_tokens"][0]
        print(f"| {regime} | {fmt(m(l3, 'local'))} | {fmt(m(c3, 'comigs-1g1s'))} | {d3:+.1f}% | {fmt(m(l5, 'local'))} | "
              f"{fmt(m(c5, 'comigs-1g1s'))} ({n5}) | {d5:+.1f}% | {d5 - d3:+.1f} points | {g(c3):.2f} / {g(c5):.2f} |")


def table_fedgap(runs, split="dev"):
    """Where FedAvg wins: CoMiGS-1G1S and its variants (fedgap), FedAvg with one expert and CoMiGS-2G
    (fedgap2) against FedAvg (2 experts, lr 1e-2) of the baselines plan; per-seed relative difference."""
    base, fg, fg2 = runs.get("baselines", {}), runs.get("fedgap", {}), runs.get("fedgap2", {})
    cols = [("CoMiGS-1G1S (reference)", "baselines", "reference", "comigs-1g1s"),
            ("spec-lr0.5", "fedgap", "spec-lr0.5", "comigs-1g1s"),
            ("gen-lr2", "fedgap", "gen-lr2", "comigs-1g1s"),
            ("lb-weight 0", "fedgap3", "lb0", "comigs-1g1s"),
            ("router before, every 10", "fedgap3", "before10", "comigs-1g1s"),
            ("FedAvg 1 expert", "fedgap2", "fedavg-1expert", "fedavg"),
            ("CoMiGS-2G", "fedgap2", "comigs-2g", "comigs-2g")]
    fg3 = runs.get("fedgap3", {})
    # emb-h0's "before10" ran in the phase plan
    fg3 = {r: dict(v, **({"before10": runs["phase"][r]["before10"]} if r in runs.get("phase", {}) and
                         "before10" in runs["phase"][r] and "before10" not in v else {}))
           for r, v in fg3.items()}
    src = {"baselines": base, "fedgap": fg, "fedgap2": fg2, "fedgap3": fg3}
    regimes = sorted(set(fg) | set(fg2), key=regime_key)
    print(f"\n### Where FedAvg wins: mean {split} perplexity (tuning seeds) and the change against FedAvg "
          "(2 averaged experts, mean routing, lr 1e-2)\n")
    print("| regime | FedAvg | " + " | ".join(c for c, *_ in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for regime in regimes:
        fed = base.get(regime, {}).get("lr1e-2", {})
        row = [regime, fmt([metric(r, "fedavg", split) for r in fed.values()])]
        for _, plan, variant, method in cols:
            v = src[plan].get(regime, {}).get(variant, {})
            seeds = sorted(s for s in v if s in fed and metric(v[s], method, split))
            if not seeds:
                row.append("-")
                continue
            vals = [metric(v[s], method, split) for s in seeds]
            d = statistics.mean(pct(x, metric(fed[s], "fedavg", split)) for x, s in zip(vals, seeds))
            gen = v[seeds[0]]["methods"][method].get("mean_generalist_share")
            g = (f", {statistics.mean(v[s]['methods'][method]['mean_generalist_share'] for s in seeds):.2f}"
                 if gen is not None and method.startswith("comigs-1g") else "")
            row.append(f"{fmt(vals)} ({d:+.1f}%{g})")
        print("| " + " | ".join(row) + " |")
    print("\nIn brackets: the change against FedAvg (mean over seeds of the per-seed relative difference) and, for "
          "CoMiGS-1G1S, the generalist's mean gate weight on test tokens.")


def table_keepbest(runs, split="dev"):
    """--keep-best at 6000 tokens (fedgap2's keepbest runs) against the same runs without it (baselines)."""
    fg2, base = runs.get("fedgap2", {}), runs.get("baselines", {})
    rows = [(r, fg2[r]["keepbest"]) for r in sorted(fg2, key=regime_key) if "keepbest" in fg2[r]]
    if not rows:
        return
    print(f"\n### --keep-best at 6000 training tokens ({split} split, tuning seeds)\n")
    print("| regime | FedAvg | FedAvg keep-best | CoMiGS-1G1S | CoMiGS-1G1S keep-best | CoMiGS vs FedAvg | "
          "the same, both keep-best | FedAvg's kept rounds | CoMiGS' kept rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for regime, kb in rows:
        fed, ref = base.get(regime, {}).get("lr1e-2", {}), base.get(regime, {}).get("reference", {})
        seeds = sorted(set(kb) & set(fed) & set(ref))
        if not seeds:
            continue
        f = [metric(fed[s], "fedavg", split) for s in seeds]
        c = [metric(ref[s], "comigs-1g1s", split) for s in seeds]
        fk = [metric(kb[s], "fedavg", split) for s in seeds]
        ck = [metric(kb[s], "comigs-1g1s", split) for s in seeds]
        kept = lambda m: " / ".join(",".join(str(u["kept_round"]) for u in kb[s]["methods"][m]["users"]) for s in seeds)
        print(f"| {regime} | {fmt(f)} | {fmt(fk)} | {fmt(c)} | {fmt(ck)} | "
              f"{mean_change(c, f):+.1f}% | "
              f"{mean_change(ck, fk):+.1f}% | {kept('fedavg')} | {kept('comigs-1g1s')} |")
    print("\nKept round 20: the final download; an earlier round r: the user's model right after round r's local steps.")


def table_stop(runs, split="dev"):
    """--keep-best choosing each user's round on a stop split no method trains on (--stop-tokens 3000)
    against choosing it on validation (CoMiGS' router's training data), at the same training, validation,
    test and dev tokens (the stop plan)."""
    plan = runs.get("stop", {})
    rows = [r for r in sorted(plan, key=regime_key)]
    if not rows:
        return
    methods = [("local", "Local"), ("fedavg", "FedAvg"), ("comigs-1g1s", "CoMiGS-1G1S")]
    print(f"\n### Early stopping on a split no router trains on ({split} split, tuning seeds)\n")
    print("Each cell: mean perplexity with --keep-best choosing on validation → on the stop split (change). "
          "Last columns: CoMiGS-1G1S against each baseline, both under the same rule (validation → stop).\n")
    print("| regime | seeds | " + " | ".join(n for _, n in methods) + " | CoMiGS vs Local | CoMiGS vs FedAvg | "
          "kept rounds on stop (Local / FedAvg / CoMiGS, seed 10) |")
    print("|---|---|" + "---|" * (len(methods) + 3))
    for regime in rows:
        v = plan[regime]
        def entries(variant_pair):
            got = {}
            for variant in variant_pair:
                for sd, res in v.get(variant, {}).items():
                    for m, e in res["methods"].items():
                        got.setdefault(sd, {})[m] = (e, res)
            return got
        val = entries(("keepbest", "local-keepbest"))
        stp = entries(("keepbest-stop3000", "local-keepbest-stop3000"))
        seeds = sorted(sd for sd in set(val) & set(stp)
                       if all(m in val[sd] and m in stp[sd] for m, _ in methods))
        if not seeds:
            continue
        def ppl(d, sd, m):
            e, res = d[sd][m]
            return e["mean_dev_ppl"] if split == "dev" else e["mean_test_ppl"]
        cells = []
        for m, _ in methods:
            a = [ppl(val, sd, m) for sd in seeds]
            b = [ppl(stp, sd, m) for sd in seeds]
            cells.append(f"{statistics.mean(a):.3f} → {statistics.mean(b):.3f} "
                         f"({mean_change(b, a):+.1f}%)")
        for base in ("local", "fedavg"):
            a = statistics.mean(pct(ppl(val, sd, "comigs-1g1s"), ppl(val, sd, base)) for sd in seeds)
            b = statistics.mean(pct(ppl(stp, sd, "comigs-1g1s"), ppl(stp, sd, base)) for sd in seeds)
            cells.append(f"{a:+.1f}% → {b:+.1f}%")
        kept = " / ".join(",".join(str(u["kept_round"]) for u in stp[seeds[0]][m][0]["users"]) for m, _ in methods)
        print(f"| {regime} | {','.join(map(str, seeds))} | " + " | ".join(cells) + f" | {kept} |")
    print("\nChanges: mean over seeds of the per-seed relative difference. Kept round 20: the final download.")


def table_stopsize(runs, split="dev"):
    """The stop split's size (session 6): --keep-best choosing on validation (the stop plan's keepbest runs),
    on 3000 stop tokens (the stop plan) and on 6000 and 12000 (the stopsize plan), at the same training,
    validation, test and dev tokens; per method the mean perplexity and the kept rounds."""
    stop, size = runs.get("stop", {}), runs.get("stopsize", {})
    rules = [("validation", "stop", ""), ("stop 3000", "stop", "-stop3000"), ("stop 6000", "stopsize", "-stop6000"),
             ("stop 12000", "stopsize", "-stop12000")]
    methods = [("local", "Local"), ("fedavg", "FedAvg"), ("comigs-1g1s", "CoMiGS-1G1S")]
    print(f"\n### The stop split's size ({split} split, tuning seeds)\n")
    print("Each cell: mean perplexity over seeds, and per seed the kept rounds of the four users (20: the final "
          "download).\n")
    print("| regime | method | " + " | ".join(name for name, _, _ in rules) + " | 3000 → 6000 | 6000 → 12000 |")
    print("|---|---|" + "---|" * (len(rules) + 2))
    for regime in sorted(set(stop) & set(size), key=regime_key):
        for m, name in methods:
            variant = lambda suffix: ("local-keepbest" if m == "local" else "keepbest") + suffix
            got = [{sd: res["methods"][m] for sd, res in runs[plan][regime].get(variant(suffix), {}).items()
                    if m in res["methods"]} for _, plan, suffix in rules]
            seeds = sorted(set.intersection(*(set(g) for g in got)))
            if not seeds:
                continue
            key = "mean_dev_ppl" if split == "dev" else "mean_test_ppl"
            cells, means = [], []
            for g in got:
                mean = statistics.mean(g[sd][key] for sd in seeds)
                means.append(mean)
                kept = " / ".join(",".join(str(u["kept_round"]) for u in g[sd]["users"]) for sd in seeds)
                cells.append(f"{mean:.3f} ({kept})")
            print(f"| {regime} | {name} | " + " | ".join(cells) +
                  f" | {pct(means[2], means[1]):+.1f}% | {pct(means[3], means[2]):+.1f}% |")
    print("\nSeeds " + ", ".join(map(str, TUNING)) + " (kept rounds in that order); changes: of the mean over seeds. "
          "The splits are the same at every size: the runs' curves (the first test tokens after every round) agree "
          "to the last digit.")


def table_stop_router(runs, split="dev"):
    """The router schedule under the fair stopping rule (stop-router plan): CoMiGS-1G1S with the reference
    schedule against router phases every 10 steps before the step, both --keep-best --stop-tokens 6000."""
    plan = runs.get("stop-router", {})
    key = "mean_dev_ppl" if split == "dev" else "mean_test_ppl"
    print(f"\n### Router phases every 10 steps at each round's start, under the fair stopping rule "
          f"({split} split, tuning seeds)\n")
    print("| regime | seeds | reference | before10 | change | per seed | generalist weight (reference → before10) |")
    print("|---|---|---|---|---|---|---|")
    rows = [(regime, "", "") for regime in sorted(plan, key=regime_key)]
    rows += [(regime, "-stop12000", " (stop 12000)") for regime in sorted(plan, key=regime_key)]
    for regime, suffix, label in rows:
        ref, b10 = plan[regime].get("reference" + suffix, {}), plan[regime].get("before10" + suffix, {})
        seeds = sorted(set(ref) & set(b10))
        if not seeds:
            continue
        a = [ref[s]["methods"]["comigs-1g1s"][key] for s in seeds]
        b = [b10[s]["methods"]["comigs-1g1s"][key] for s in seeds]
        per = ", ".join(f"{pct(y, x):+.1f}%" for x, y in zip(a, b))
        gen = lambda d: statistics.mean(d[s]["methods"]["comigs-1g1s"]["mean_generalist_share"] for s in seeds)
        print(f"| {regime}{label} | {','.join(map(str, seeds))} | {fmt(a)} | {fmt(b)} | {mean_change(b, a):+.1f}% | {per} | "
              f"{gen(ref):.2f} → {gen(b10):.2f} |")
    print("\nChange: mean over seeds of the per-seed relative difference (negative: before10 better).")


TUNING = [10, 11]


def local_lr_mid_pairs(runs):
    """(regime, seeds, Local at 3e-3 by seed, Local at 1e-2 by seed) of the local-lr-mid plan, over the seeds
    both learning rates ran."""
    for regime, v in runs.get("local-lr-mid", {}).items():
        a, b = v.get("local-lr3e-3", {}), v.get("local-lr1e-2", {})
        seeds = sorted(set(a) & set(b))
        if seeds:
            yield regime, seeds, a, b


def table_local_lr_mid(runs, split="dev"):
    """Local's learning rate at 3k-50k tokens (local-lr-mid plan): 3e-3 (what the final plans used there)
    against 1e-2, both --keep-best --stop-tokens 6000, tuning seeds."""
    key = "mean_dev_ppl" if split == "dev" else "mean_test_ppl"
    print(f"\n### Local's learning rate at 3k-50k tokens under the fair rule ({split} split, tuning seeds)\n")
    print("| regime | seeds | Local 3e-3 | Local 1e-2 | change | per seed | kept rounds 3e-3 / 1e-2 (first seed) |")
    print("|---|---|---|---|---|---|---|")
    for regime, seeds, a, b in sorted(local_lr_mid_pairs(runs), key=lambda t: regime_key(t[0])):
        x = [a[s]["methods"]["local"][key] for s in seeds]
        y = [b[s]["methods"]["local"][key] for s in seeds]
        kept = " / ".join(",".join(str(u["kept_round"]) for u in d[seeds[0]]["methods"]["local"]["users"]) for d in (a, b))
        print(f"| {regime} | {','.join(map(str, seeds))} | {fmt(x)} | {fmt(y)} | {mean_change(y, x):+.1f}% | "
              f"{', '.join(f'{pct(q, p):+.1f}%' for p, q in zip(x, y))} | {kept} |")
    print("\nChange: mean over seeds of the per-seed relative difference (negative: 1e-2 better).")


def final_rows(runs, plan="final", split="test"):
    """Per regime of the final plan: seeds -> {method: results.json entry} (local from its own runs),
    with the host's perplexity."""
    rows = {}
    for regime, variants in runs.get(plan, {}).items():
        seeds = defaultdict(dict)
        for v, by_seed in variants.items():
            for s, res in by_seed.items():
                for m, entry in res["methods"].items():
                    seeds[s][m] = entry
                seeds[s]["host"] = res["host_mean_ppl"]
        complete = {s: d for s, d in seeds.items() if all(m in d for m in ("local", "fedavg", "comigs-1g1s"))}
        if complete:
            rows[regime] = complete
    return rows


def table_chosen_on_tuning_seeds(runs, split="test"):
    """The final plan's choices (without --keep-best) on the tuning seeds' runs of the baselines plan:
    Local lr 3e-3 (1e-2 on all of a text), FedAvg lr 1e-2, CoMiGS the reference schedule."""
    base = runs.get("baselines", {})
    key = "mean_test_ppl" if split == "test" else "mean_dev_ppl"
    print(f"\n### The same choices on the tuning seeds (baselines plan, seeds 10-11, no --keep-best; {split} split)\n")
    print("| regime | Local | FedAvg | CoMiGS-1G1S | pFedMoE | CoMiGS vs Local | vs FedAvg | generalist weight |")
    print("|---|---|---|---|---|---|---|---|")
    for regime in sorted(base, key=regime_key):
        v = base[regime]
        local_v = v.get("lr1e-2" if regime.endswith("-all") else "lr3e-3", {})
        fed_v, ref_v = v.get("lr1e-2", {}), v.get("reference", {})
        seeds = sorted(set(local_v) & set(fed_v) & set(ref_v))
        if not seeds:
            continue
        loc = [local_v[s]["methods"]["local"][key] for s in seeds]
        fed = [fed_v[s]["methods"]["fedavg"][key] for s in seeds]
        com = [ref_v[s]["methods"]["comigs-1g1s"][key] for s in seeds]
        pfm = [ref_v[s]["methods"]["pfedmoe"][key] for s in seeds if "pfedmoe" in ref_v[s]["methods"]]
        gen = statistics.mean(ref_v[s]["methods"]["comigs-1g1s"]["mean_generalist_share"] for s in seeds)
        dl = mean_change(com, loc)
        df = mean_change(com, fed)
        print(f"| {regime} | {fmt(loc)} | {fmt(fed)} | {fmt(com)} | {fmt(pfm)} | {dl:+.1f}% | {df:+.1f}% | {gen:.2f} |")


def local_lr_mid_choice(runs):
    """Per regime of the local-lr-mid plan, Local's learning-rate variant with the lower mean dev perplexity
    over the tuning seeds ("local-lr3e-3" or "local-lr1e-2")."""
    choice = {}
    for regime, seeds, a, b in local_lr_mid_pairs(runs):
        x = statistics.mean(a[s]["methods"]["local"]["mean_dev_ppl"] for s in seeds)
        y = statistics.mean(b[s]["methods"]["local"]["mean_dev_ppl"] for s in seeds)
        choice[regime] = "local-lr1e-2" if y < x else "local-lr3e-3"
    return choice


def final_stop_rows_tuned_local(runs, split="test"):
    """final-stop's rows with Local's report runs at 1e-2 (final-stop-local-lr) where local-lr-mid's dev grid
    prefers 1e-2 and those runs exist for every seed of the row; the regimes changed."""
    rows = final_rows(runs, "final-stop", split)
    redo = runs.get("final-stop-local-lr", {})
    changed = []
    for regime, variant in local_lr_mid_choice(runs).items():
        if variant != "local-lr1e-2" or regime not in rows:
            continue
        got = redo.get(regime, {}).get(variant, {})
        if not all(s in got for s in rows[regime]):
            continue
        for s in rows[regime]:
            rows[regime][s] = dict(rows[regime][s], local=got[s]["methods"]["local"])
        changed.append(regime)
    return rows, changed


def table_final(runs, plan="final", split="test", rows=None, title=None):
    """The "when collaboration pays" table: mean test perplexity of the deployed models, report seeds."""
    rows = final_rows(runs, plan, split) if rows is None else rows
    key = "mean_test_ppl" if split == "test" else "mean_dev_ppl"
    print(f"\n### {title or 'When collaboration pays'} ({plan}; {split} split, mean ± sd over report seeds)\n")
    print("| regime | seeds | host | Local | FedAvg | CoMiGS-1G1S | vs Local | vs FedAvg | vs better | "
          "generalist weight | personal to specialist (best layer) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for regime in sorted(rows, key=regime_key):
        seeds = rows[regime]
        val = {m: [seeds[s][m][key] for s in sorted(seeds)] for m in ("local", "fedavg", "comigs-1g1s")}
        c = val["comigs-1g1s"]
        d_local = mean_change(c, val["local"])
        d_fedavg = mean_change(c, val["fedavg"])
        d_better = mean_change(c, map(min, val["local"], val["fedavg"]))
        gen = statistics.mean(seeds[s]["comigs-1g1s"]["mean_generalist_share"] for s in seeds)
        p2s = [max((l["personal_to_specialist"] for l in seeds[s]["comigs-1g1s"]["routing_by_layer"]
                    if l["personal_to_specialist"] is not None), default=None) for s in seeds]
        p2s = f"{statistics.mean(p2s):.2f}" if all(x is not None for x in p2s) else "-"
        host = statistics.mean(seeds[s]["host"] for s in seeds)
        print(f"| {regime} | {len(seeds)} | {host:.3f} | {fmt(val['local'])} | {fmt(val['fedavg'])} | {fmt(c)} | "
              f"{d_local:+.1f}% | {d_fedavg:+.1f}% | {d_better:+.1f}% | {gen:.2f} | {p2s} |")
    print("\nvs: mean over seeds of the per-seed relative difference of CoMiGS-1G1S (negative: CoMiGS better; "
          "'better': the better baseline of each seed). Generalist weight: CoMiGS' mean gate weight on "
          "generalists over test tokens, all layers and users. Personal to specialist: embedded corpus, the "
          "share of personal-source test tokens whose top expert is the specialist, in the layer where it is "
          "highest.")


def table_final_per_seed(runs, plan="final-stop", split="test", rows=None, title=None):
    """Per regime and seed of a final plan: each method's mean perplexity, CoMiGS-1G1S against each baseline,
    and the rounds the four users kept (20: the final download)."""
    rows = final_rows(runs, plan, split) if rows is None else rows
    key = "mean_test_ppl" if split == "test" else "mean_dev_ppl"
    print(f"\n### {title or 'Per seed'} ({plan}; {split} split)\n")
    print("| regime | seed | Local | FedAvg | CoMiGS-1G1S | vs Local | vs FedAvg | generalist weight | "
          "kept rounds (Local / FedAvg / CoMiGS) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for regime in sorted(rows, key=regime_key):
        for s in sorted(rows[regime]):
            e = rows[regime][s]
            loc, fed, com = (e[m][key] for m in ("local", "fedavg", "comigs-1g1s"))
            kept = " / ".join(",".join(str(u["kept_round"]) for u in e[m]["users"]) for m in ("local", "fedavg", "comigs-1g1s"))
            print(f"| {regime} | {s} | {loc:.3f} | {fed:.3f} | {com:.3f} | {pct(com, loc):+.1f}% | {pct(com, fed):+.1f}% | "
                  f"{e['comigs-1g1s']['mean_generalist_share']:.2f} | {kept} |")


def table_final_more(rows, split="test"):
    """pFedMoE and CoMiGS-2S (final-stop-more) beside CoMiGS-1G1S, each against the better of Local and FedAvg
    per seed (the report rows, Local at its tuned learning rate)."""
    key = "mean_test_ppl" if split == "test" else "mean_dev_ppl"
    methods = ("comigs-1g1s", "pfedmoe", "comigs-2s")
    have = {r: seeds for r, seeds in rows.items() if all(m in e for e in seeds.values() for m in methods)}
    if not have:
        return
    print(f"\n### The other router methods (final-stop and final-stop-more; {split} split, mean over report seeds)\n")
    print("| regime | seeds | better baseline | CoMiGS-1G1S | pFedMoE | CoMiGS-2S | 1G1S vs better | pFedMoE vs better | "
          "2S vs better |")
    print("|---|---|---|---|---|---|---|---|---|")
    for regime in sorted(have, key=regime_key):
        seeds = have[regime]
        order = sorted(seeds)
        better = [min(seeds[s]["local"][key], seeds[s]["fedavg"][key]) for s in order]
        val = {m: [seeds[s][m][key] for s in order] for m in methods}
        changes = " | ".join(f"{mean_change(val[m], better):+.1f}%" for m in methods)
        print(f"| {regime} | {len(order)} | {statistics.mean(better):.3f} | "
              f"{' | '.join(f'{statistics.mean(val[m]):.3f}' for m in methods)} | {changes} |")
    print("\nvs better: mean over seeds of the per-seed relative difference against the better of Local and FedAvg in "
          "that seed (negative: the router method better).")


def best_p2s(entry):
    return max((l["personal_to_specialist"] for l in entry["routing_by_layer"] if l["personal_to_specialist"] is not None),
               default=None)


def table_final_r16(runs, split="test"):
    """CoMiGS-1G1S with rank-16 experts (final-r16) against the final plan's baselines at rank 8 and, on all
    of a text, against the baselines at rank 16 (equal capacity)."""
    rows, r16 = final_rows(runs, "final", split), runs.get("final-r16", {})
    key = "mean_test_ppl" if split == "test" else "mean_dev_ppl"
    print(f"\n### CoMiGS-1G1S with rank-16 experts (final-r16; {split} split, mean ± sd over report seeds)\n")
    print("| regime | seeds | CoMiGS-1G1S (rank 8) | CoMiGS-1G1S rank 16 | vs rank 8 | vs Local | vs FedAvg | vs better | "
          "Local rank 16 | FedAvg rank 16 | vs better at rank 16 | generalist weight | personal to specialist |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for regime in sorted(r16, key=regime_key):
        com = r16[regime].get("comigs-rank16", {})
        seeds = sorted(s for s in com if s in rows.get(regime, {}))
        if not seeds:
            continue
        base = rows[regime]
        c16 = [com[s]["methods"]["comigs-1g1s"][key] for s in seeds]
        c8 = [base[s]["comigs-1g1s"][key] for s in seeds]
        loc = [base[s]["local"][key] for s in seeds]
        fed = [base[s]["fedavg"][key] for s in seeds]
        d = lambda ys: f"{mean_change(c16, ys):+.1f}%"
        b16 = r16[regime].get("baselines-rank16", {})
        s16 = [s for s in seeds if s in b16]
        l16 = [b16[s]["methods"]["local"][key] for s in s16]
        f16 = [b16[s]["methods"]["fedavg"][key] for s in s16]
        c16s = [com[s]["methods"]["comigs-1g1s"][key] for s in s16]
        eq = f"{mean_change(c16s, map(min, l16, f16)):+.1f}%" if s16 else "-"
        gen = statistics.mean(com[s]["methods"]["comigs-1g1s"]["mean_generalist_share"] for s in seeds)
        p2s = [best_p2s(com[s]["methods"]["comigs-1g1s"]) for s in seeds]
        p2s = f"{statistics.mean(p2s):.2f}" if all(x is not None for x in p2s) else "-"
        print(f"| {regime} | {len(seeds)} | {fmt(c8)} | {fmt(c16)} | {d(c8)} | {d(loc)} | {d(fed)} | "
              f"{d([min(x, y) for x, y in zip(loc, fed)])} | {fmt(l16)} | {fmt(f16)} | {eq} | {gen:.2f} | {p2s} |")
    print("\nRank 16 doubles every expert (parameters, and the generalist's upload per round); the baselines at rank 16 "
          "(learning rate 1e-2, --keep-best) are the comparison at equal capacity.")


def table_final_val30000(runs, split="test"):
    """All of a text with a 30k-token validation set (final-val30000): CoMiGS-1G1S at rank 16 against Local
    at rank 8 and at rank 16, every run at the same split sizes."""
    fv = runs.get("final-val30000", {})
    key = "mean_test_ppl" if split == "test" else "mean_dev_ppl"
    print(f"\n### All of a text, 30k validation tokens per user (final-val30000; {split} split, report seeds)\n")
    print("| regime | seeds | Local | Local rank 16 | CoMiGS-1G1S rank 16 | vs Local | vs Local rank 16 | generalist weight |")
    print("|---|---|---|---|---|---|---|---|")
    for regime in sorted(fv, key=regime_key):
        com, loc, l16 = (fv[regime].get(v, {}) for v in ("comigs-rank16", "local", "local-rank16"))
        seeds = sorted(set(com) & set(loc))
        if not seeds:
            continue
        c = [com[s]["methods"]["comigs-1g1s"][key] for s in seeds]
        lo = [loc[s]["methods"]["local"][key] for s in seeds]
        s16 = [s for s in seeds if s in l16]
        lo16 = [l16[s]["methods"]["local"][key] for s in s16]
        d16 = (f"{statistics.mean(pct(com[s]['methods']['comigs-1g1s'][key], l16[s]['methods']['local'][key]) for s in s16):+.1f}%"
               if s16 else "-")
        gen = statistics.mean(com[s]["methods"]["comigs-1g1s"]["mean_generalist_share"] for s in seeds)
        n16 = f" ({len(s16)} seeds)" if s16 and len(s16) != len(seeds) else ""
        print(f"| {regime} | {len(seeds)} | {fmt(lo)} | {fmt(lo16)}{n16} | {fmt(c)} | "
              f"{mean_change(c, lo):+.1f}% | {d16}{n16} | {gen:.2f} |")
    print("\nAnother validation size deals other chunks to the test split: compare these numbers with each other, "
          "not with the tables at 3000 validation tokens. FedAvg (8-12% behind Local on all of a text, with --keep-best) was not run.")


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
        if plan == "final":
            table_chosen_on_tuning_seeds(runs)
            table_final(runs, plan, "test")
            table_final(runs, plan, "dev")
        elif plan == "final-stop":
            table_final(runs, plan, "test")
            table_final_per_seed(runs, plan, "test")
            rows, changed = final_stop_rows_tuned_local(runs, "test")
            if changed:
                title = "Local at 1e-2 where its dev grid prefers it: " + ", ".join(sorted(changed, key=regime_key))
                only = {r: rows[r] for r in changed}
                table_final(runs, plan, "test", only, title)
                table_final_per_seed(runs, plan, "test", only, "Per seed, " + title)
            table_final_more(rows, "test")
        elif plan == "final-r16":
            table_final_r16(runs)
        elif plan == "final-val30000":
            table_final_val30000(runs)
        elif plan == "valshare":
            table_valshare(runs)
            table_valshare_scarce(runs)
        elif plan in ("fedgap", "fedgap2"):
            if plan == "fedgap" or "fedgap" not in plans:
                table_fedgap(runs)
            if plan == "fedgap2":
                table_keepbest(runs)
        elif plan == "stopsize":
            table_stopsize(runs, "dev")
        elif plan == "local-lr-mid":
            table_local_lr_mid(runs, "dev")
        elif plan == "stop-router":
            table_stop_router(runs, "dev")
        elif plan == "stop":
            table_stop(runs, "dev")  # tuning seeds: dev only (test is for the report seeds)
        elif plan == "val":
            table_val(runs)
            table_variants(runs, plan, ref)
        elif plan == "capacity":
            table_capacity(runs)
            table_variants(runs, plan, ref)
        elif plan not in ("baselines", "capacity-base", "repro", "stop"):
            table_variants(runs, plan, ref)


if __name__ == "__main__":
    main()
