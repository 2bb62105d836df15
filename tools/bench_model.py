#!/usr/bin/python3
"""Whole-model speed and memory of comigs against the PyTorch reference, measured in the same run.

For each shape (GPT-2-124M, SmolLM2-135M) and each round, one process per measurement, interleaved so
that the load of a shared machine falls on both sides alike:
  1. tools/reference_model.py --mode step (PyTorch, the reference's whole-model semantics: each expert a
     whole MLP copy; tuned: OpenBLAS with OpenMP, tcmalloc, the same thread count), then comigs-bench
     model_step/fp32/<shape>, then model_step/bf16/<shape>;
  2. the same for the evaluation forward (--mode fwd, model_fwd/...);
  3. comigs' thread scaling: model_step/fp32/<shape> and .../one_thread, repetitions interleaved in one
     process;
  4. decode: comigs-bench model_decode/{mixture,lora}/<shape> (one new token, KV cache at context 512),
     and the reference's --mode decode for context;
  5. the floor (GPT-2 only, in the step's process, repetitions interleaved with the steps'):
     model_floor/{fp32,bf16}/<shape>, the frozen base's GEMMs of one step and nothing else. reference /
     floor is the best ratio any implementation of the step on these backends could reach.
Every process runs under /usr/bin/time -v: its maximum resident set size is that side's peak memory
(weights, activations, work space, allocator and runtime). Prints each figure per round, then the
medians over rounds against the targets of issue 24.

Usage (Debian's torch lives in /usr/bin/python3):
    /usr/bin/python3 tools/bench_model.py --bench build/benchmarks/comigs-bench --threads 2 --rounds 3
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OPENBLAS_OMP = "/usr/lib/x86_64-linux-gnu/openblas-openmp"
TCMALLOC = "libtcmalloc_minimal.so.4"
SHAPES = ("gpt2_124m", "smollm2_135m")
FLOOR_SHAPES = ("gpt2_124m",)  # shapes with model_floor cases


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def timed_process(cmd, env):
    """Runs cmd under /usr/bin/time -v; returns (stdout, peak RSS in bytes)."""
    proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return proc.stdout, int(m.group(1)) * 1024 if m else float("nan")


def torch_env(threads, wait_policy):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    env["LD_LIBRARY_PATH"] = OPENBLAS_OMP + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env["LD_PRELOAD"] = TCMALLOC
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy.upper()
    return env


def comigs_env(threads, wait_policy):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy.upper()
    return env


def run_torch(shape, mode, args):
    cmd = ["/usr/bin/python3", os.path.join(HERE, "reference_model.py"), "--shape", shape, "--mode", mode,
           "--threads", str(args.threads), "--reps", str(args.torch_reps)]
    out, rss = timed_process(cmd, torch_env(args.threads, args.torch_wait_policy))
    res = json.loads(out.strip().splitlines()[-1])
    blas = " ".join(res.get("blas", []))
    if "openblas" not in blas:
        print(f"WARNING: the reference did not load OpenBLAS ({blas or 'no BLAS seen'}): its times mean little")
    return res["seconds"], rss


def run_bench(cases, args, reps=None):
    """One comigs-bench process over `cases` (a regex): {name: seconds (median)}, peak RSS."""
    reps = reps or args.reps
    cases = cases.replace("$", "(/real_time)?$")  # the cases run in real time: their names end so
    cmd = [args.bench, f"--benchmark_filter={cases}", f"--benchmark_repetitions={reps}",
           "--benchmark_enable_random_interleaving=true", "--benchmark_format=json",
           f"--benchmark_min_time={args.min_time}"]
    if reps > 1:
        cmd.append("--benchmark_report_aggregates_only=true")
    out, rss = timed_process(cmd, comigs_env(args.threads, args.comigs_wait_policy))
    res = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") != "median" and not (reps < 2 and b.get("run_type") == "iteration"):
            continue
        name = b["run_name"].replace("/real_time", "")
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        res[name] = dict(b, seconds=b["real_time"] * scale)
    return res, rss


def mb(x):
    return f"{x / 2**20:7.0f} MB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=os.path.join(HERE, "..", "build", "benchmarks", "comigs-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="comigs-bench repetitions per process (median)")
    ap.add_argument("--torch-reps", type=int, default=3, help="reference_model.py repetitions per process")
    ap.add_argument("--min-time", default="0.1")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--skip", default="",
                    help="comma list of parts to skip: fwd, bf16, floor, scaling, decode, torch-decode")
    ap.add_argument("--torch-wait-policy", default="default", choices=["default", "passive", "active"],
                    help="OMP_WAIT_POLICY of the reference (default: unset, libgomp's spin-then-sleep)")
    ap.add_argument("--comigs-wait-policy", default="passive", choices=["default", "passive", "active"])
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    shapes = [s for s in args.shapes.split(",") if s]

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; threads {args.threads}; {datetime.datetime.now():%Y-%m-%d %H:%M}; "
          f"rounds {args.rounds}; comigs repetitions {args.reps}, reference repetitions {args.torch_reps} (medians)")
    print(f"reference: OpenBLAS-OpenMP ({OPENBLAS_OMP}), LD_PRELOAD={TCMALLOC}, OMP_WAIT_POLICY "
          f"{args.torch_wait_policy}; comigs: OMP_WAIT_POLICY {args.comigs_wait_policy}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other work on the machine skews every figure)")

    rounds = []
    for rnd in range(args.rounds):
        r = {}
        for shape in shapes:
            load = os.getloadavg()[0]
            ts, trss = run_torch(shape, "step", args)
            cases = f"model_step/fp32/{shape}$" + ("" if "bf16" in skip else f"|model_step/bf16/{shape}$")
            floor = "floor" not in skip and shape in FLOOR_SHAPES
            if floor:
                cases += f"|model_floor/fp32/{shape}$" + ("" if "bf16" in skip else f"|model_floor/bf16/{shape}$")
            res, crss = run_bench(cases, args)
            r[(shape, "torch_step")], r[(shape, "torch_step_rss")] = ts, trss
            r[(shape, "step")] = res[f"model_step/fp32/{shape}"]["seconds"]
            r[(shape, "step_rss")] = crss
            if "bf16" not in skip:
                r[(shape, "step16")] = res[f"model_step/bf16/{shape}"]["seconds"]
                _, r[(shape, "step16_rss")] = run_bench(f"model_step/bf16/{shape}$", args, reps=1)
                # the fp32 case's own peak, without the bf16 model beside it in the process
                _, r[(shape, "step_rss")] = run_bench(f"model_step/fp32/{shape}$", args, reps=1)
            print(f"round {rnd + 1} {shape} (load {load:.1f}): step  reference {ts:7.3f} s {mb(trss)} | comigs fp32 "
                  f"{r[(shape, 'step')]:7.3f} s {mb(r[(shape, 'step_rss')])}"
                  + ("" if "bf16" in skip else f" | bf16 {r[(shape, 'step16')]:7.3f} s {mb(r[(shape, 'step16_rss')])}"))
            if floor:
                line = f"round {rnd + 1} {shape}: floor (frozen-base GEMMs only)"
                for prec, key in (("fp32", "floor"), ("bf16", "floor16")):
                    if f"model_floor/{prec}/{shape}" not in res:
                        continue
                    r[(shape, key)] = res[f"model_floor/{prec}/{shape}"]["seconds"]
                    step = r[(shape, "step" if prec == "fp32" else "step16")]
                    line += (f" | {prec} {r[(shape, key)]:7.3f} s: step / floor {step / r[(shape, key)]:.2f}, "
                             f"reference / floor {ts / r[(shape, key)]:.2f}x")
                print(line)
            if "fwd" not in skip:
                tf, tfrss = run_torch(shape, "fwd", args)
                res, cfrss = run_bench(f"model_fwd/fp32/{shape}$", args)
                r[(shape, "torch_fwd")], r[(shape, "fwd")] = tf, res[f"model_fwd/fp32/{shape}"]["seconds"]
                print(f"round {rnd + 1} {shape}: fwd   reference {tf:7.3f} s {mb(tfrss)} | comigs fp32 "
                      f"{r[(shape, 'fwd')]:7.3f} s {mb(cfrss)}")
            if "scaling" not in skip:
                res, _ = run_bench(f"model_step/fp32/{shape}$|model_step/fp32/{shape}/one_thread$", args)
                r[(shape, "scaling")] = (res[f"model_step/fp32/{shape}/one_thread"]["seconds"] /
                                         res[f"model_step/fp32/{shape}"]["seconds"])
                print(f"round {rnd + 1} {shape}: scaling 1 -> {args.threads} threads {r[(shape, 'scaling')]:.2f}x")
            if "decode" not in skip:
                res, _ = run_bench(f"model_decode/(mixture|lora)/fp32/{shape}$", args)
                mix = res[f"model_decode/mixture/fp32/{shape}"]["seconds"]
                lora = res[f"model_decode/lora/fp32/{shape}"]["seconds"]
                r[(shape, "decode")] = mix / lora
                line = (f"round {rnd + 1} {shape}: decode at context 512: mixture {mix * 1e3:.2f} ms, plain LoRA "
                        f"{lora * 1e3:.2f} ms ({mix / lora:.2f}x)")
                if "torch-decode" not in skip:
                    td, _ = run_torch(shape, "decode", args)
                    line += f"; reference {td * 1e3:.1f} ms"
                print(line)
        rounds.append(r)

    def med(shape, key):
        vals = [r[(shape, key)] for r in rounds if (shape, key) in r]
        return statistics.median(vals) if vals else None

    def each(shape, key, fmt="{:.2f}"):
        return ", ".join(fmt.format(r[(shape, key)]) for r in rounds if (shape, key) in r)

    print(f"\ntargets (medians over {args.rounds} rounds; load average now {os.getloadavg()[0]:.2f}):")
    for shape in shapes:
        rows = []

        def target(what, value, goal, ok, how):
            rows.append(("INFO" if ok is None else "MET" if ok else "MISSED", what, value, goal, how))

        for r in rounds:
            r[(shape, "ratio32")] = r[(shape, "torch_step")] / r[(shape, "step")]
            if (shape, "step16") in r:
                r[(shape, "ratio16")] = r[(shape, "torch_step")] / r[(shape, "step16")]
            r[(shape, "mem")] = r[(shape, "step_rss")] / r[(shape, "torch_step_rss")]
            if (shape, "fwd") in r:
                r[(shape, "ratio_fwd")] = r[(shape, "torch_fwd")] / r[(shape, "fwd")]
        v = med(shape, "ratio32")
        target("fp32 step vs reference", f"{v:.2f}x", ">= 3x", v >= 3.0, f"rounds {each(shape, 'ratio32')}")
        v = med(shape, "ratio16")
        if v is not None:
            target("bf16-base step vs reference", f"{v:.2f}x", ">= 5x", v >= 5.0, f"rounds {each(shape, 'ratio16')}")
        for key, what in (("floor", "fp32"), ("floor16", "bf16")):
            for r in rounds:
                if (shape, key) in r:
                    r[(shape, key + "_ratio")] = r[(shape, "torch_step")] / r[(shape, key)]
            v = med(shape, key + "_ratio")
            if v is not None:
                target(f"best possible {what} ratio (ref / floor)", f"{v:.2f}x", "(bound)", None,
                       f"floor {med(shape, key):.3f} s; rounds {each(shape, key + '_ratio')}")
        v = med(shape, "mem")
        target("peak memory of a step vs reference", f"{100 * v:.0f}%", "<= 50%", v <= 0.5,
               f"comigs {mb(med(shape, 'step_rss')).strip()}, reference {mb(med(shape, 'torch_step_rss')).strip()}; "
               f"rounds {each(shape, 'mem')}")
        v = med(shape, "ratio_fwd")
        if v is not None:
            target("evaluation forward vs reference", f"{v:.2f}x", "(context)", None, f"rounds {each(shape, 'ratio_fwd')}")
        v = med(shape, "scaling")
        if v is not None:
            target(f"thread scaling 1 -> {args.threads}", f"{v:.2f}x", ">= 1.8x", v >= 1.8, f"rounds {each(shape, 'scaling')}")
        v = med(shape, "decode")
        if v is not None:
            target("decode: mixture vs plain LoRA", f"{v:.2f}x", "<= 1.3x", v <= 1.3, f"rounds {each(shape, 'decode')}")
        print(f"  {shape}:")
        for status, what, value, goal, how in rows:
            print(f"    {status:6s} {what:38s} {value:>8s}  target {goal:9s} ({how})")


if __name__ == "__main__":
    main()
