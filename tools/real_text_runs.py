#!/usr/bin/env python3
"""Runs the comigs-demo sweeps behind docs/real-text.md and keeps every run's results.json.

    tools/real_text_runs.py BUILD_DIR OUT_DIR PLAN [PLAN...] [--jobs 2] [--dry-run]

A plan is a list of runs; a run is one comigs-demo command (one regime, one seed, one variant of the
flags, some methods). Its results land in OUT_DIR/<plan>/<regime>/<variant>/s<seed>/results.json (a plan
that completes another, like final-stop-rest, in that plan's folder); a run whose results.json exists is
skipped, so a sweep resumes where it stopped. Hosts are pretrained once per
(host text, seed) and cached in OUT_DIR/hosts/. Every run uses one thread and runs under `nice`; --jobs
runs that many at once (the machine these were measured on was shared: 2 jobs at most).

Regimes (see docs/real-text.md):
  emb-h<h>[-<n>]   embedded corpus, heterogeneity h, n training tokens per user (default 6000)
  ml-<n>           --setting multilingual, n training tokens per user ("all": everything)
  dom-<n>          --setting domains, likewise
Seeds 10 and 11 are for tuning (choices read off the dev split); seeds 0, 1, 2 for the reported tables
(choices made before they run; tables read their test split). tools/real_text_tables.py makes the tables.
"""
import argparse
import itertools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

TUNING_SEEDS = [10, 11]
REPORT_SEEDS = [0, 1, 2]
# The router study screens changes on four regimes that ask different things of the router: personal
# text to the specialist (h = 0.9), everything to the generalist (h = 0), a useless generalist (all of
# a real text).
STUDY_REGIMES = ["emb-h0.9", "emb-h0", "ml-all", "dom-all"]
SIZES = ["3000", "6000", "12000", "25000", "50000", "all"]
DEV = ["--dev-tokens", "10000"]  # every run evaluates the tuning split

# The demo's schedule before this study: the paper's router schedule (every 30 expert steps, 10 router
# steps), rates scaled to the tiny host (data.md), balancing target 1/E.
REFERENCE = ["--schedule", "reference"]
# Router phases every 10 expert steps, before the step (at each round's start, on the generalist just
# downloaded): the phase plan's "before10".
BEFORE10 = ["--router-every", "10", "--router-phase", "before"]
# The fair stopping split's size (session 6, the stopsize plan): --keep-best chooses every method's round on
# it, held out from every method's training.
STOP_TOKENS = "6000"
# CoMiGS' router schedule in the final-stop plan (session 6, the stop-router plan): the reference's, the
# demo's default (before10 lost 1.0% at ml-3000, seeds 10-11, on stop splits of 6000 and 12000 tokens).
FINAL_ROUTER = []
# The fair stopping rule (session 6): every method deploys its best round on STOP_TOKENS no method trains on.
FAIR_KEEP = ["--keep-best", "--stop-tokens", STOP_TOKENS]


# The final-stop plan's regimes in the order of the claims they serve, and those session 6's machine time did
# not reach (session 7's final-stop-rest: the plenty-of-data claim first, then 25k and 50k tokens).
FINAL_STOP_REGIMES = ["emb-h0.9", "emb-h0.5", "ml-3000", "dom-3000", "ml-6000", "dom-6000", "ml-12000", "dom-12000",
                      "emb-h0", "ml-all", "dom-all", "ml-25000", "dom-25000", "ml-50000", "dom-50000"]
FINAL_STOP_REST_REGIMES = ["ml-all", "dom-all", "ml-25000", "dom-25000", "ml-50000", "dom-50000"]
# A plan that completes another writes into that plan's folders, so the tables read them as one plan.
PLAN_FOLDER = {"final-stop-rest": "final-stop", "final-stop-more": "final-stop"}


def final_stop_runs(r):
    """The final-stop plan's runs of one regime (report seeds)."""
    keep = FAIR_KEEP
    out = []
    for s in REPORT_SEEDS:
        if r.endswith("-all"):  # every method at 1e-2: one run
            out.append((r, "shared", s, "local,fedavg,comigs-1g1s", REFERENCE + FINAL_ROUTER + keep))
            continue
        out.append((r, "shared", s, "fedavg,comigs-1g1s", REFERENCE + FINAL_ROUTER + keep))
        out.append((r, "local", s, "local", lr_flags("3e-3") + keep))
    return out


def regime_flags(regime):
    kind, _, rest = regime.partition("-")
    if kind == "emb":
        h, _, n = rest.partition("-")
        flags = ["--heterogeneity", h.lstrip("h")]
        if n:
            flags += ["--train-tokens", n]
        return flags, "emb"
    setting = {"ml": "multilingual", "dom": "domains"}[kind]
    flags = ["--setting", setting]
    if rest != "all":
        flags += ["--train-tokens", rest]
    return flags, setting


def lr_flags(lr):
    return ["--lr", lr, "--lr-min", f"{float(lr) / 10:g}"]


def runs_of(plan):
    """(regime, variant, seed, methods, flags) of a plan, in the order they run."""
    tuning_regimes = ["emb-h0.9", "emb-h0.5", "emb-h0", "ml-6000", "ml-all", "dom-6000", "dom-all"]
    out = []
    if plan == "baselines":  # where things stand, and each baseline's learning rate (a grid per regime)
        for r, s in itertools.product(tuning_regimes, TUNING_SEEDS):
            grid = ["1e-2", "3e-2"] if r.endswith("-all") else ["3e-3", "1e-2"]
            for lr in grid:
                out.append((r, f"lr{lr}", s, "local,fedavg", lr_flags(lr)))
            out.append((r, "reference", s, "comigs-1g1s,pfedmoe", REFERENCE))
            if r in ("emb-h0.9", "emb-h0.5"):  # early stopping (measured on two regimes: it was not kept)
                out.append((r, "lr1e-2-keepbest", s, "local,fedavg", lr_flags("1e-2") + ["--keep-best"]))
                out.append((r, "reference-keepbest", s, "comigs-1g1s", REFERENCE + ["--keep-best"]))
    elif plan == "router":  # one change at a time against the reference schedule, on CoMiGS-1G1S
        variants = {
            "router-lr3e-2": ["--router-lr", "3e-2"],
            "router-every10": ["--router-every", "10"],
            "target0.2": ["--generalist-target", "0.2"],
            "lr3e-3": lr_flags("3e-3"),
            "spec-lr0.5": ["--specialist-lr-scale", "0.5"],
        }
        for name, flags in variants.items():  # variant by variant, so partial results are complete rows
            for r, s in itertools.product(STUDY_REGIMES, TUNING_SEEDS):
                out.append((r, name, s, "comigs-1g1s", REFERENCE + flags))
    elif plan == "phase":  # when the router learns, against which generalist (see docs/real-text.md)
        variants = {
            "before10": ["--router-every", "10", "--router-phase", "before"],
            "before10-recal10": ["--router-every", "10", "--router-phase", "before", "--recalibrate", "10"],
            "recal10": ["--recalibrate", "10"],
            "gen-lr0.5": lr_flags("5e-3") + ["--specialist-lr-scale", "2"],
        }
        for name, flags in variants.items():
            for r, s in itertools.product(STUDY_REGIMES, TUNING_SEEDS):
                out.append((r, name, s, "comigs-1g1s", REFERENCE + flags))
    elif plan == "val":  # a larger validation set where the text allows it (all of a real text)
        variants = {
            "val30000": ["--val-tokens", "30000"],
            "before10-val30000": ["--router-every", "10", "--router-phase", "before", "--val-tokens", "30000"],
            "r16-val30000": ["--ranks", "16,16,16,16", "--val-tokens", "30000"],  # with the capacity study's best
        }
        for name, flags in variants.items():
            for r, s in itertools.product(["ml-all", "dom-all"], TUNING_SEEDS):
                out.append((r, name, s, "comigs-1g1s", REFERENCE + flags))
        # The held-out splits are dealt in proportion to their sizes: another validation size gives other
        # dev (and test) chunks. Local at the same sizes measures that shift (it never reads validation).
        for r, s in itertools.product(["ml-all", "dom-all"], TUNING_SEEDS):
            out.append((r, "local-val30000", s, "local", ["--val-tokens", "30000"]))
    elif plan == "final":  # the "when collaboration pays" table: report seeds, choices fixed beforehand
        # Local's learning rate is the best of its dev grid at the nearest tuned size on a log scale
        # (6000 tokens: 3e-3; all: 1e-2); FedAvg's (1e-2) and CoMiGS' schedule (reference) won at every
        # tuned regime. --keep-best (each user deploys its best-validation round) for every method: it
        # changed Local and CoMiGS by < 0.1% and saved FedAvg from overfitting at h = 0.9 and 0.5.
        keep = ["--keep-best"]
        # In order of what the claims need (a sweep that stops early leaves complete rows).
        regimes = ["emb-h0.9", "ml-6000", "dom-6000", "ml-all", "dom-all", "emb-h0.5", "emb-h0"] + \
            [f"{k}-{n}" for n in ["12000", "3000", "50000", "25000"] for k in ["ml", "dom"]]
        for r in regimes:
            for s in REPORT_SEEDS:
                if r.endswith("-all"):  # every method at 1e-2: one run
                    out.append((r, "shared", s, "local,fedavg,comigs-1g1s", REFERENCE + keep))
                    continue
                out.append((r, "shared", s, "fedavg,comigs-1g1s", REFERENCE + keep))
                out.append((r, "local", s, "local", lr_flags("3e-3") + keep))
    elif plan in ("final-stop", "final-stop-rest"):  # session 6: the report rows under the fair stopping rule
        # Every method --keep-best on the stop split (held out from all of them; STOP_TOKENS, the stopsize
        # plan), CoMiGS-1G1S with the router schedule the stop-router plan chose (FINAL_ROUTER); learning rates
        # as the final plan (Local 3e-3 below all of a text, 1e-2 on all of it; FedAvg 1e-2).
        # final-stop-rest (session 7): the same runs, into the same folders (PLAN_FOLDER), of the regimes
        # session 6 did not reach, all of a text first (the plenty-of-data claim).
        regimes = FINAL_STOP_REGIMES if plan == "final-stop" else FINAL_STOP_REST_REGIMES
        for r in regimes:
            out += final_stop_runs(r)
    elif plan == "final-stop-more":  # session 7: the router methods the report table leaves out (pFedMoE and
        # CoMiGS with two specialists), under final-stop's rule and flags, into its folders (variant "more")
        keep = FAIR_KEEP
        for r in FINAL_STOP_REGIMES:
            for s in REPORT_SEEDS:
                out.append((r, "more", s, "pfedmoe,comigs-2s", REFERENCE + FINAL_ROUTER + keep))
    elif plan == "local-lr-mid":  # session 7: Local's learning rate at 25k and 50k tokens, which the final plans
        # took from the nearest tuned size (6000: 3e-3) without tuning; the dev grid again, under final-stop's rule
        # (12000 added after 25k and 50k preferred 1e-2: it took 3e-3 by the same rule; then 3000, untuned too,
        # and 6000, whose grid ran without --keep-best)
        keep = FAIR_KEEP
        for r, s in itertools.product(["ml-50000", "dom-50000", "ml-25000", "dom-25000", "ml-12000", "dom-12000",
                                       "ml-6000", "dom-6000", "ml-3000", "dom-3000"], TUNING_SEEDS):
            for lr in ["3e-3", "1e-2"]:
                out.append((r, f"local-lr{lr}", s, "local", lr_flags(lr) + keep))
    elif plan == "final-stop-local-lr":  # session 7: Local's report runs at 25k and 50k at 1e-2, used where the
        # local-lr-mid plan's dev grid prefers it (the rule fixed before those runs; docs/real-text.md)
        keep = FAIR_KEEP
        # (3000 and 6000: 3e-3 won local-lr-mid's grid there, so none are needed)
        for r, s in itertools.product(["ml-50000", "dom-50000", "ml-25000", "dom-25000", "dom-12000", "ml-12000"],
                                      REPORT_SEEDS):
            out.append((r, "local-lr1e-2", s, "local", lr_flags("1e-2") + keep))
    elif plan == "repro":  # one earlier run again: does the current program give the same perplexities?
        out.append(("ml-all", "target0.2", 10, "comigs-1g1s", REFERENCE + ["--generalist-target", "0.2"]))
    elif plan == "final-r16":  # CoMiGS-1G1S with rank-16 experts (the capacity study's best), report seeds;
        # the baselines at rank 16 where they are the equal-capacity comparison that matters (all of a text)
        keep = ["--keep-best"]
        regimes = ["emb-h0.9", "ml-6000", "dom-6000", "ml-all", "dom-all", "emb-h0.5", "emb-h0"] + \
            [f"{k}-{n}" for n in ["12000", "3000"] for k in ["ml", "dom"]]
        r16 = ["--ranks", "16,16,16,16"]
        for r in regimes:
            for s in REPORT_SEEDS:
                out.append((r, "comigs-rank16", s, "comigs-1g1s", REFERENCE + keep + r16))
        for r, s in itertools.product(["ml-all", "dom-all"], REPORT_SEEDS):
            out.append((r, "baselines-rank16", s, "local,fedavg", lr_flags("1e-2") + keep + r16))
    elif plan == "final-val30000":  # all of a text with a 30k-token validation set (2.5% of a user's text):
        # CoMiGS-1G1S at rank 16 (the val plan's best) against Local at rank 8 and 16, all at that split
        keep, v30, r16 = ["--keep-best"], ["--val-tokens", "30000"], ["--ranks", "16,16,16,16"]
        for r in ["ml-all", "dom-all"]:
            for s in REPORT_SEEDS:
                out.append((r, "comigs-rank16", s, "comigs-1g1s", REFERENCE + keep + v30 + r16))
                out.append((r, "local", s, "local", lr_flags("1e-2") + keep + v30))
            for s in REPORT_SEEDS:
                out.append((r, "local-rank16", s, "local", lr_flags("1e-2") + keep + v30 + r16))
    elif plan == "capacity":  # more experts or rank (CoMiGS variants; equal-capacity baselines: "capacity-base")
        # Why: on all of a text Local has two local rank-8 experts, CoMiGS-1G1S one local expert beside an
        # averaged compromise (1G2S gives it Local's local capacity); at h = 0 FedAvg averages both experts,
        # CoMiGS one (2G1S gives it FedAvg's shared capacity). Ordered by the regime each one targets.
        variants = {
            "1g2s-top3": ("comigs-1g1s", ["--experts", "3,3,3,3", "--top-k", "3"], ["ml-all", "dom-all", "emb-h0.9", "emb-h0"]),
            "2g1s-top3": ("comigs-2g", ["--experts", "3,3,3,3", "--top-k", "3"], ["emb-h0", "emb-h0.9", "ml-all", "dom-all"]),
            "rank16": ("comigs-1g1s", ["--ranks", "16,16,16,16"], ["ml-all", "dom-all", "emb-h0", "emb-h0.9"]),
            # Both at once: FedAvg's shared and Local's local capacity (roles G, G, S, S).
            "2g2s-top4": ("comigs-2g", ["--experts", "4,4,4,4", "--top-k", "4"], ["emb-h0", "ml-all", "dom-all", "emb-h0.9"]),
        }
        for name, (methods, flags, regimes) in variants.items():
            for r, s in itertools.product(regimes, TUNING_SEEDS):
                out.append((r, name, s, methods, REFERENCE + flags))
    elif plan == "capacity-base":  # the baselines at CoMiGS' capacity: 3 experts (1G2S / 2G1S), rank 16
        for r, s in itertools.product(["ml-all", "dom-all", "emb-h0", "emb-h0.9"], TUNING_SEEDS):
            lr = "1e-2" if r.endswith("-all") else "3e-3"  # Local's dev-grid winner (FedAvg: 1e-2 everywhere)
            out.append((r, f"experts3-local-lr{lr}", s, "local", ["--experts", "3,3,3,3", "--top-k", "3"] + lr_flags(lr)))
            out.append((r, "experts3-fedavg-lr1e-2", s, "fedavg", ["--experts", "3,3,3,3", "--top-k", "3"] + lr_flags("1e-2")))
        for r, s in itertools.product(["ml-all", "dom-all", "emb-h0", "emb-h0.9"], TUNING_SEEDS):  # rank 16
            lr = "1e-2" if r.endswith("-all") else "3e-3"
            out.append((r, f"rank16-local-lr{lr}", s, "local", ["--ranks", "16,16,16,16"] + lr_flags(lr)))
            out.append((r, "rank16-fedavg-lr1e-2", s, "fedavg", ["--ranks", "16,16,16,16"] + lr_flags("1e-2")))
        for r, s in itertools.product(["ml-all", "dom-all", "emb-h0", "emb-h0.9"], TUNING_SEEDS):  # 2G2S's capacity
            lr = "1e-2" if r.endswith("-all") else "3e-3"
            out.append((r, f"experts4-local-lr{lr}", s, "local", ["--experts", "4,4,4,4", "--top-k", "4"] + lr_flags(lr)))
            out.append((r, "experts4-fedavg-lr1e-2", s, "fedavg", ["--experts", "4,4,4,4", "--top-k", "4"] + lr_flags("1e-2")))
    elif plan == "speclr":  # the specialists' learning rate against the generalists' (CoMiGS-1G1S)
        variants = {"spec-lr2": ["--specialist-lr-scale", "2"], "spec-lr0.5": ["--specialist-lr-scale", "0.5"]}
        for name, flags in variants.items():
            for r, s in itertools.product(["ml-all", "dom-all", "emb-h0", "emb-h0.9"], TUNING_SEEDS):
                out.append((r, name, s, "comigs-1g1s", REFERENCE + flags))
    elif plan == "fedgap3":  # the specialist's cost at h = 0: the balancing loss's pull to 1/2, and earlier router phases
        for r, s in itertools.product(["emb-h0", "ml-6000", "dom-6000"], TUNING_SEEDS):
            out.append((r, "lb0", s, "comigs-1g1s", REFERENCE + ["--lb-weight", "0"]))
        for r, s in itertools.product(["ml-6000", "dom-6000"], TUNING_SEEDS):  # emb-h0: the phase plan's before10
            out.append((r, "before10", s, "comigs-1g1s", REFERENCE + ["--router-every", "10", "--router-phase", "before"]))
    elif plan == "valshare-scarce":  # --val-tokens 50% where it changes the scarce sizes: 3000 -> 1500, 12000 -> 6000
        for r, s in itertools.product(["ml-3000", "ml-12000", "dom-3000", "dom-12000"], TUNING_SEEDS):
            for name, v in (("", []), ("-val50pct", ["--val-tokens", "50%"])):
                out.append((r, "reference" + name, s, "comigs-1g1s", REFERENCE + v))
                out.append((r, "local-lr3e-3" + name, s, "local", lr_flags("3e-3") + v))
    elif plan == "fedgap2":  # where the gap to FedAvg comes from: its two-expert average, or CoMiGS' specialist?
        for r, s in itertools.product(["emb-h0", "ml-6000", "dom-6000"], TUNING_SEEDS):
            # FedAvg with one rank-8 expert (gate 1): CoMiGS' generalist alone, trained as FedAvg trains it.
            out.append((r, "fedavg-1expert", s, "fedavg", lr_flags("1e-2") + ["--experts", "1,1,1,1"]))
            # Two generalists and a router (no specialist): the router's gates without a local expert.
            out.append((r, "comigs-2g", s, "comigs-2g", REFERENCE))
        # The report runs use --keep-best: FedAvg's kept model of a round before the last is its model right
        # after that round's local steps (FedAvg fine-tuned locally). Does that flip the ranking at 6000 tokens?
        for r, s in itertools.product(["ml-6000", "dom-6000"], TUNING_SEEDS):
            out.append((r, "keepbest", s, "fedavg,comigs-1g1s", REFERENCE + ["--keep-best"]))
    elif plan == "valshare":  # a validation set that is a share of each user's training text (--val-tokens 50%)
        # All of a text: 50% gives validation a third of what test and dev leave (~390k tokens a user).
        v50 = ["--val-tokens", "50%"]
        for r, s in itertools.product(["ml-all", "dom-all"], TUNING_SEEDS):
            out.append((r, "val50pct", s, "comigs-1g1s", REFERENCE + v50))
            out.append((r, "local-val50pct", s, "local", v50))  # the same split (Local never reads validation)
        # 6000 training tokens: 50% is the old default of 3000, so the runs must not change at all.
        for r in ["emb-h0.9", "ml-6000"]:
            out.append((r, "reference", 10, "comigs-1g1s", REFERENCE))
            out.append((r, "val50pct", 10, "comigs-1g1s", REFERENCE + v50))
    elif plan == "stop":  # --keep-best judged for every method on a split no router trains on (--stop-tokens)
        # The validation split is CoMiGS' router's training data: keep-best on it chooses CoMiGS' round on
        # data it was fitted to, the baselines' on held-out data. The stop split is held out from every
        # method; at these training sizes it comes from chunks training leaves, so training, validation,
        # test and dev are the same tokens as without it, and "keepbest" (on validation, as the final plan)
        # is the comparison at the same split. keepbest at 6000 also repeats fedgap2's runs (bit for bit).
        keep, stop = ["--keep-best"], ["--stop-tokens", "3000"]
        for r in ["ml-6000", "dom-6000", "ml-3000", "dom-3000", "emb-h0.9", "ml-12000"]:
            for s in TUNING_SEEDS:
                out.append((r, "keepbest-stop3000", s, "fedavg,comigs-1g1s", REFERENCE + keep + stop))
                out.append((r, "local-keepbest-stop3000", s, "local", lr_flags("3e-3") + keep + stop))
                out.append((r, "keepbest", s, "fedavg,comigs-1g1s", REFERENCE + keep))
                out.append((r, "local-keepbest", s, "local", lr_flags("3e-3") + keep))
    elif plan == "stopsize":  # session 6: the stop split's size (3000 in the stop plan, 6000, 12000 here)
        # At a limited training size the stop split comes from chunks training leaves, so its size moves no
        # other split: the same training, validation, test and dev tokens at every size (checked on the runs'
        # curves, which read the first test tokens after every round, before any stopping).
        keep = ["--keep-best"]
        for n, r in itertools.product(["6000", "12000"], ["ml-3000", "dom-3000"]):
            stop = ["--stop-tokens", n]
            for s in TUNING_SEEDS:
                out.append((r, f"keepbest-stop{n}", s, "fedavg,comigs-1g1s", REFERENCE + keep + stop))
                out.append((r, f"local-keepbest-stop{n}", s, "local", lr_flags("3e-3") + keep + stop))
    elif plan == "stop-router":  # session 6: the router schedule under the fair stopping rule (CoMiGS-1G1S)
        keep, stop = ["--keep-best"], ["--stop-tokens", STOP_TOKENS]
        for r, s in itertools.product(["emb-h0.9", "ml-3000", "dom-3000", "ml-6000", "dom-6000"], TUNING_SEEDS):
            out.append((r, "reference", s, "comigs-1g1s", REFERENCE + keep + stop))
            out.append((r, "before10", s, "comigs-1g1s", REFERENCE + BEFORE10 + keep + stop))
        # ml-3000, where before10 was behind on the mean (+1.7% and -0.1%): again on a 12000-token stop split
        # (the reference's runs: the stopsize plan's keepbest-stop12000, same flags)
        for s in TUNING_SEEDS:
            out.append(("ml-3000", "before10-stop12000", s, "comigs-1g1s",
                        REFERENCE + BEFORE10 + ["--keep-best", "--stop-tokens", "12000"]))
    elif plan == "fedgap":  # where FedAvg wins: does the generalist learn as FedAvg's experts do? (CoMiGS-1G1S)
        # The reference again first (the current program against the baselines plan's runs, bit for bit).
        out.append(("emb-h0", "reference", 10, "comigs-1g1s", REFERENCE))
        variants = {
            # The specialist at half the rate: it takes less of the local fit while the gates are still even.
            "spec-lr0.5": ["--specialist-lr-scale", "0.5"],
            # The generalist at twice the rate (the specialist keeps 1e-2): a gate g < 1 scales the
            # generalist's share of the output, FedAvg's two averaged experts share all of it.
            "gen-lr2": lr_flags("2e-2") + ["--specialist-lr-scale", "0.5"],
        }
        for name, flags in variants.items():
            for r, s in itertools.product(["emb-h0", "ml-6000", "dom-6000"], TUNING_SEEDS):
                out.append((r, name, s, "comigs-1g1s", REFERENCE + flags))
    else:
        sys.exit(f"unknown plan '{plan}'")
    return out


def command(demo, out_dir, plan, regime, variant, seed, methods, flags):
    rflags, host_kind = regime_flags(regime)
    host = out_dir / "hosts" / f"{host_kind}-s{seed}.safetensors"
    folder = out_dir / PLAN_FOLDER.get(plan, plan) / regime / variant / f"s{seed}"
    cmd = [str(demo), "--quiet", "--threads", "1", "--seed", str(seed), "--host-cache", str(host), "--out", str(folder),
           "--methods", methods] + DEV + rflags + flags
    return folder, host, cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build")
    ap.add_argument("out")
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--only", default="", help="run only the runs whose folder matches this regular expression")
    a = ap.parse_args()
    out_dir = pathlib.Path(a.out)
    (out_dir / "hosts").mkdir(parents=True, exist_ok=True)
    # A copy of the program, so that rebuilding it while a sweep runs cannot change the sweep's runs.
    demo = out_dir / "bin" / "comigs-demo"
    if not a.dry_run:
        demo.parent.mkdir(exist_ok=True)
        tmp = demo.with_suffix(".new")
        shutil.copy2(pathlib.Path(a.build) / "examples" / "comigs-demo", tmp)
        os.replace(tmp, demo)  # a new file: runs still going keep the program they started with
    todo = []
    for plan in a.plans:
        for run in runs_of(plan):
            folder, host, cmd = command(demo, out_dir, plan, *run)
            if re.search(a.only, str(folder)) and not (folder / "results.json").exists():
                todo.append((folder, host, cmd))
    # Hosts first, one run per host, so that parallel runs never pretrain the same host twice.
    first, rest, seen = [], [], set()
    for t in todo:
        (rest if t[1] in seen or t[1].exists() else first).append(t)
        seen.add(t[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"{len(todo)} runs to do ({len(first)} pretrain a host)", flush=True)

    def taken(folder):
        """Another runner is on it: its lock names a live process."""
        try:
            pid = int((folder / "lock").read_text())
            os.kill(pid, 0)
            return True
        except (OSError, ValueError):
            return False

    def run(t):
        folder, _, cmd = t
        if a.dry_run:
            print(" ".join(cmd))
            return
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "results.json").exists() or taken(folder):
            return
        (folder / "command.txt").write_text(" ".join(cmd) + "\n")
        p = subprocess.Popen(["nice", "-n", "19"] + cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        (folder / "lock").write_text(str(p.pid))
        log, _ = p.communicate()
        (folder / "log.txt").write_text(log)
        (folder / "lock").unlink(missing_ok=True)
        status = "ok" if p.returncode == 0 else f"FAILED ({p.returncode})"
        print(f"{status}: {folder}", flush=True)

    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        list(ex.map(run, first))
        list(ex.map(run, rest))


if __name__ == "__main__":
    main()
