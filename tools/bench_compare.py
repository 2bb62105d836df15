#!/usr/bin/python3
"""Speed of comigs against the PyTorch reference semantics, measured one after the other on this machine.

Runs, with the same thread count:
  1. the naive PyTorch reference (tools/reference_mixture.py: every selected expert recomputes the whole
     frozen MLP, autograd backward) at GPT-2 MLP shapes, T = 1024, d = 768, hidden 3072, E = 4, top-2,
     rank 8, fp32; and PyTorch's plain dense MLP for context. PyTorch runs as a user who tunes it would
     run it: in a process of its own with OpenBLAS's OpenMP build as its BLAS (LD_LIBRARY_PATH, package
     libopenblas0-openmp), tcmalloc as its allocator (LD_PRELOAD, package libtcmalloc-minimal4) and the
     default OpenMP wait policy; that process checks in its own memory map that it really loaded both,
     and the script stops if not (with netlib's reference BLAS torch is about 50x slower);
  2. comigs-bench (Google Benchmark) for the matching cases, with --benchmark_repetitions in random
     interleaved order, including mixture_fwd_bwd on one thread (the scaling figure) and a probe of the
     host's vector FMA throughput on one and on all threads (how much a shared machine lets two threads
     scale at all this minute);
then prints every ratio against its target. All figures are medians of the repetitions.

Usage (Debian's torch lives in /usr/bin/python3):
    /usr/bin/python3 tools/bench_compare.py --bench build/benchmarks/comigs-bench --threads 2 --reps 5
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

T, D, H, E, K, R = 1024, 768, 3072, 4, 2, 8


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def median_time(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


TORCH_BLAS_DIR = "/usr/lib/x86_64-linux-gnu/openblas-openmp"
TORCH_MALLOC = "libtcmalloc_minimal.so.4"


def loaded_libraries():
    """Paths of the shared libraries mapped into this process."""
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if ".so" in line.split()[-1]})


def torch_setup(blas_dir, malloc):
    """What this process runs torch on: its BLAS and allocator as mapped in memory (after a product)."""
    import torch
    a = torch.randn(256, 256)
    (a @ a).sum().item()  # make sure the BLAS is loaded and used
    libs = loaded_libraries()
    blas = [p for p in libs if "blas" in os.path.basename(p)]
    mallocs = [p for p in libs if "tcmalloc" in p or "jemalloc" in p]
    problems = []
    if blas_dir and not any(os.path.realpath(p).startswith(os.path.realpath(blas_dir) + "/") for p in blas):
        problems.append(f"torch's BLAS is {blas or 'not loaded'}, not from {blas_dir} (apt-get install libopenblas0-openmp)")
    if malloc and not any(os.path.basename(malloc).split(".so")[0] in os.path.basename(p) for p in mallocs):
        problems.append(f"{malloc} is not loaded (apt-get install libtcmalloc-minimal4)")
    return {"torch": torch.__version__, "blas": blas, "malloc": mallocs, "problems": problems,
            "threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}


def torch_env(threads, blas_dir, malloc, wait_policy):
    """The environment of the PyTorch process: the BLAS directory first on the loader's path, the
    allocator preloaded, every thread pool at `threads`."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    if blas_dir:
        env["LD_LIBRARY_PATH"] = blas_dir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    if malloc:
        env["LD_PRELOAD"] = malloc + (" " + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    set_wait_policy(env, wait_policy)
    return env


def set_wait_policy(env, wait_policy):
    if wait_policy == "default":
        env.pop("OMP_WAIT_POLICY", None)
    elif wait_policy != "env":
        env["OMP_WAIT_POLICY"] = wait_policy.upper()


def torch_reference_process(args):
    """torch_reference in a process of its own with the tuned environment; returns its figures and setup."""
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--threads", str(args.threads),
           "--reps", str(args.reps), "--torch-blas", args.torch_blas, "--torch-malloc", args.torch_malloc]
    env = torch_env(args.threads, args.torch_blas, args.torch_malloc, args.wait_policy)
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if res["setup"]["problems"]:
        sys.exit("PyTorch is not on the tuned setup, so ratios against it would mean nothing:\n  " +
                 "\n  ".join(res["setup"]["problems"]))
    return res


def torch_reference(threads, reps):
    """Median seconds of the reference fwd+bwd, its forward alone, and the dense MLP fwd+bwd."""
    import torch
    import torch.nn.functional as F
    import reference_mixture as ref

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ref.MixtureConfig(form="gelu", experts=E, top_k=K, rank=R, alpha=16.0, scaling="sqrt",
                            expert0_importance=0.25, routing="topk")
    tensors = {
        "x": torch.randn(T, D),
        "dy": torch.randn(T, D),
        "router.weight": 0.02 * torch.randn(E, D),
        "fc.weight": 0.02 * torch.randn(H, D),
        "fc.bias": 0.02 * torch.randn(H),
        "proj.weight": 0.02 * torch.randn(D, H),
        "proj.bias": 0.02 * torch.randn(D),
    }
    for e in range(E):
        tensors[f"experts.{e}.fc.lora_A"] = 0.02 * torch.randn(R, D)
        tensors[f"experts.{e}.fc.lora_B"] = 0.01 * torch.randn(H, R)
        tensors[f"experts.{e}.proj.lora_A"] = 0.02 * torch.randn(R, H)
        tensors[f"experts.{e}.proj.lora_B"] = 0.01 * torch.randn(D, R)
    p = ref.build_params(tensors, cfg, dtype=torch.float32)

    def fwd():
        with torch.no_grad():
            ref.mixture_forward(p, cfg)

    def fwd_bwd():
        ref.forward_backward(p, cfg)

    x = p["x"]
    w1, b1, w2, b2 = p["fc.weight"], p["fc.bias"], p["proj.weight"], p["proj.bias"]

    def dense_fwd_bwd():
        y = F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)
        torch.autograd.grad((y * p["dy"]).sum(), [x])

    return {
        "ref_fwd_bwd": median_time(fwd_bwd, reps),
        "ref_fwd": median_time(fwd, reps),
        "dense_fwd_bwd": median_time(dense_fwd_bwd, reps),
    }


def run_bench(bench, threads, reps, bench_filter, min_time, wait_policy):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    set_wait_policy(env, wait_policy)
    # Repetitions of the cases run in random interleaved order: a ratio of two cases (the non-GEMM share
    # divides base_gemms by mixture_fwd_bwd) then compares medians taken over the same stretch of time,
    # not over two stretches half a minute apart on a machine whose speed drifts by 10-25%.
    cmd = [bench, f"--benchmark_filter={bench_filter}", f"--benchmark_repetitions={reps}",
           "--benchmark_enable_random_interleaving=true",
           "--benchmark_report_aggregates_only=true", "--benchmark_format=json",
           f"--benchmark_min_time={min_time}"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    res = {}
    for b in data["benchmarks"]:
        # With one repetition Google Benchmark reports the run itself, no aggregates.
        if b.get("aggregate_name") != "median" and not (reps < 2 and b.get("run_type") == "iteration"):
            continue
        name = b["run_name"].replace("/real_time", "")
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        res[name.replace("/iterations:1", "")] = dict(b, seconds=b["real_time"] * scale)
    return res, data.get("context", {})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=os.path.join(HERE, "..", "build", "benchmarks", "comigs-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median)")
    ap.add_argument("--rounds", type=int, default=3, help="reference/comigs rounds (median of the ratios)")
    ap.add_argument("--min-time", default="0.5")
    ap.add_argument("--skip-scaling", action="store_true", help="do not run the one-thread pass")
    ap.add_argument("--wait-policy", default="default", choices=["default", "passive", "active", "env"],
                    help="OMP_WAIT_POLICY for both PyTorch and comigs (default: unset, the OpenMP runtime's "
                         "own policy; 'env' keeps yours)")
    ap.add_argument("--torch-blas", default=TORCH_BLAS_DIR,
                    help="directory put first on PyTorch's LD_LIBRARY_PATH for its libblas.so.3 ('' for none)")
    ap.add_argument("--torch-malloc", default=TORCH_MALLOC, help="allocator LD_PRELOADed into PyTorch ('' for none)")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:  # the PyTorch process: its figures and setup as one JSON line
        res = torch_reference(args.threads, args.reps)
        res["setup"] = torch_setup(args.torch_blas, args.torch_malloc)
        print(json.dumps(res))
        return

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; threads: {args.threads}; "
          f"date: {datetime.date.today().isoformat()}; repetitions: {args.reps} (medians), rounds: {args.rounds}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"OMP_WAIT_POLICY: {args.wait_policy} for both sides")
    print(f"load average at start: {load:.2f} (other work on the machine skews every figure)")
    wanted = ("mixture_fwd_bwd/fp32/gpt2|mixture_fwd/fp32/gpt2|dense_mlp_fwd_bwd/fp32/gpt2|"
              "naive_mixture_fwd_bwd/fp32/gpt2|mixture_fwd_bwd/bf16/gpt2|mixture_fwd/fp32/decode|"
              "dense_mlp_fwd/fp32/decode|base_gemms/fp32/gpt2|base_gemms/bf16/gpt2|gemm_.*/gpt2|memory/|host_fma/|"
              "mixture_share/")
    if args.skip_scaling:  # the one-thread case's name extends the all-threads case's
        wanted = wanted.replace("mixture_fwd_bwd/fp32/gpt2|", "mixture_fwd_bwd/fp32/gpt2/real_time|", 1)

    # Each round measures the reference and comigs back to back, so that a change in the machine's
    # load between rounds shifts both; the reported figure is the median over rounds of each ratio.
    rounds = []
    for rnd in range(args.rounds):
        ref = torch_reference_process(args)
        if rnd == 0:
            st = ref["setup"]
            print(f"PyTorch {st['torch']} in its own process: {st['threads']} threads, BLAS "
                  f"{', '.join(st['blas'])}, allocator {', '.join(st['malloc']) or 'glibc malloc'}, OMP_WAIT_POLICY "
                  f"{st['wait_policy']} (checked in its memory map)")
        print(f"round {rnd + 1}: load {os.getloadavg()[0]:.2f}; reference ({args.threads} threads): fwd+bwd "
              f"{ref['ref_fwd_bwd'] * 1e3:.1f} ms ({T / ref['ref_fwd_bwd']:.0f} tokens/s), fwd "
              f"{ref['ref_fwd'] * 1e3:.1f} ms; PyTorch dense MLP fwd+bwd {ref['dense_fwd_bwd'] * 1e3:.1f} ms")
        res, ctx = run_bench(args.bench, args.threads, args.reps, wanted, args.min_time, args.wait_policy)
        for name in sorted(res):
            r = res[name]
            extra = f"  {r['GFLOP/s']:7.1f} GFLOP/s" if "GFLOP/s" in r else ""
            tps = f"  {r['items_per_second']:10.0f} tokens/s" if "items_per_second" in r else ""
            label = f"  [{r['label']}]" if r.get("label") else ""
            print(f"  {name:36s} {r['seconds'] * 1e3:9.3f} ms{tps}{extra}{label}")
        m = {}

        def sec(name):
            return res[name]["seconds"]

        m["fp32"] = ref["ref_fwd_bwd"] / sec("mixture_fwd_bwd/fp32/gpt2")
        best = max((n for n in res if n.startswith("gemm_") and "/fp32/" in n), key=lambda n: res[n]["GFLOP/s"])
        m["gemm"] = res["base_gemms/fp32/gpt2"]["GFLOP/s"] / res[best]["GFLOP/s"]
        m["best"] = best
        m["bf16"] = ref["ref_fwd_bwd"] / sec("mixture_fwd_bwd/bf16/gpt2")
        m["bf16_label"] = res["mixture_fwd_bwd/bf16/gpt2"].get("label", "")
        m["decode"] = sec("mixture_fwd/fp32/decode") / sec("dense_mlp_fwd/fp32/decode")
        # The share pair by pair (mixture_share: layer and base GEMMs timed back to back, 50-100 ms
        # apart), and as the ratio of the two cases' medians (seconds to minutes apart) for context.
        m["share32"] = res["mixture_share/fp32/gpt2"]["share"]
        m["share16"] = res["mixture_share/bf16/gpt2"]["share"]
        m["share32_cases"] = 1.0 - sec("base_gemms/fp32/gpt2") / sec("mixture_fwd_bwd/fp32/gpt2")
        m["share16_cases"] = 1.0 - sec("base_gemms/bf16/gpt2") / sec("mixture_fwd_bwd/bf16/gpt2")
        m["naive"] = sec("naive_mixture_fwd_bwd/fp32/gpt2") / sec("mixture_fwd_bwd/fp32/gpt2")
        m["mem"] = {p: res.get(f"memory/{p}/gpt2") for p in ("fp32", "bf16")}
        if not args.skip_scaling:
            # Same process, repetitions interleaved with the all-threads case: one stretch of time.
            m["scaling"] = sec("mixture_fwd_bwd/fp32/gpt2/one_thread") / sec("mixture_fwd_bwd/fp32/gpt2")
        one, every = res.get("host_fma/one_thread"), res.get("host_fma/all_threads")
        if one and every:
            n = int(every["threads"])
            m["host_one"] = one["vector_fma_per_thread"] / 1e9
            m["host_each"] = every["vector_fma_per_thread"] / 1e9
            # What n threads of pure arithmetic gain over one on this host now: the most any layer can.
            m["host_ceiling"] = n * m["host_each"] / m["host_one"]
            print(f"  host: {m['host_one']:.2f} G vector FMA/s on one thread, {m['host_each']:.2f} on each of {n} "
                  f"threads: {n} threads of pure arithmetic scale {m['host_ceiling']:.2f}x")
        rounds.append(m)

    def med(key):
        return statistics.median(r[key] for r in rounds)

    def each(key, fmt):
        return ", ".join(fmt.format(r[key]) for r in rounds)

    rows = []

    def target(what, value, goal, ok, how):
        # ok None: a figure shown for context, with no target of its own.
        rows.append((what, value, goal, "INFO" if ok is None else "MET" if ok else "MISSED", how))

    target("fp32 fwd+bwd speed-up vs PyTorch reference", f"{med('fp32'):.2f}x", ">= 3x", med("fp32") >= 3.0,
           f"reference / mixture_fwd_bwd/fp32/gpt2; rounds: {each('fp32', '{:.2f}')}")
    target("fp32 base GEMMs vs best fp32 GEMM", f"{100 * med('gemm'):.0f}%", ">= 85%", med("gemm") >= 0.85,
           f"base_gemms/fp32/gpt2 / best of gemm_*/fp32 ({rounds[-1]['best']}); rounds: {each('gemm', '{:.2f}')}")
    target("bf16 fwd+bwd speed-up vs PyTorch reference", f"{med('bf16'):.2f}x", ">= 8x", med("bf16") >= 8.0,
           f"reference / mixture_fwd_bwd/bf16/gpt2 [{rounds[-1]['bf16_label']}]; rounds: {each('bf16', '{:.2f}')}")
    target("decode (T = 1) latency vs dense MLP", f"{med('decode'):.2f}x", "<= 1.3x", med("decode") <= 1.3,
           f"mixture_fwd/fp32/decode / dense_mlp_fwd/fp32/decode; rounds: {each('decode', '{:.2f}')}")
    target("non-GEMM share of the fp32 layer time", f"{100 * med('share32'):.1f}%", "< 15%", med("share32") < 0.15,
           f"mixture_share/fp32/gpt2: median of 1 - base GEMMs / layer over back-to-back pairs; rounds: "
           f"{each('share32', '{:.3f}')}; as 1 - base_gemms / mixture_fwd_bwd medians: {each('share32_cases', '{:.2f}')}")
    target("non-GEMM share of the bf16 layer time", f"{100 * med('share16'):.1f}%", "(context)",
           None, f"mixture_share/bf16/gpt2; rounds: {each('share16', '{:.3f}')}; "
           f"from the cases' medians: {each('share16_cases', '{:.2f}')}")
    target("shared base vs naive per-expert (same backend)", f"{med('naive'):.2f}x", "(context)", None,
           f"naive_mixture_fwd_bwd/fp32/gpt2 / mixture_fwd_bwd/fp32/gpt2; rounds: {each('naive', '{:.2f}')}")
    for prec in ("fp32", "bf16"):
        mm = rounds[-1]["mem"][prec]
        if mm:
            target(f"memory per layer ({prec})",
                   f"weights {mm['frozen_bytes'] / 2**20:.1f} MiB, peak {mm['peak_bytes'] / 2**20:.1f} MiB",
                   "1 base copy", mm["frozen_bytes_E1"] == mm["frozen_bytes"],
                   f"memory/{prec}/gpt2: frozen bytes with E = 4 equal E = 1; peak = every heap byte of the layer")
    if not args.skip_scaling:
        target(f"thread scaling 1 -> {args.threads} threads", f"{med('scaling'):.2f}x", ">= 1.8x",
               med("scaling") >= 1.8,
               f"mixture_fwd_bwd/fp32/gpt2/one_thread / mixture_fwd_bwd/fp32/gpt2 ({args.threads} threads), "
               f"interleaved in one process; rounds: {each('scaling', '{:.2f}')}")
    host = all("host_ceiling" in r for r in rounds)
    if host:
        target("host: FMA throughput scaling 1 -> all threads", f"{med('host_ceiling'):.2f}x", "(context)", None,
               f"host_fma/all_threads vs one_thread, the ceiling for any layer; one thread "
               f"{med('host_one'):.2f} G vector FMA/s; rounds: {each('host_ceiling', '{:.2f}')}")

    print(f"\ntargets (medians over {args.rounds} rounds; load average now {os.getloadavg()[0]:.2f}):")
    for what, value, goal, status, how in rows:
        print(f"  {status:6s} {what:46s} {value:>32s}  target {goal:12s} ({how})")
    if host and not args.skip_scaling and med("host_ceiling") < 0.9 * args.threads:
        print(f"\nWARNING: {args.threads} threads of pure FMA arithmetic scaled only {med('host_ceiling'):.2f}x on this "
              f"host during the run (another tenant shares its cores), below 90% of the thread count: the thread "
              "scaling figure is limited by the machine. Measure again in a quieter hour.")


if __name__ == "__main__":
    main()
