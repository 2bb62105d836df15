#!/usr/bin/python3
"""Regenerate the golden test data in tests/golden/ (deterministic; run with Debian's python).

    /usr/bin/python3 tools/make_golden.py            # writes tests/golden/
    /usr/bin/python3 tools/make_golden.py --out DIR  # writes elsewhere (e.g. to diff)

For every case it writes <case>.safetensors (layer inputs: x, dy, frozen base, LoRA adapters, router,
config in __metadata__) and <case>.expected.safetensors (y, dx, lb_loss, <name>.grad), plus cases.txt.
Expected outputs are always computed in float64 by tools/reference_mixture.py; for float32 cases the
inputs are first rounded to float32 and the float64 results are rounded to float32 at the end.

The script also self-checks (and aborts on failure): routing margins, the naive path against an
independent shared-base computation (values and gradients), torch.autograd.gradcheck, a float32 run of
the reference against the float32 golden values, and a byte-exact read-back of every file written.
"""

import argparse
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import reference_mixture as rm  # noqa: E402
import safetensors_io as sio  # noqa: E402

T, D, HID = 7, 8, 12
TOPK_MARGIN = 0.05  # required gap between the k-th and (k+1)-th logit of every token
LORA_EFFECT = 0.5   # target std of one LoRA correction s * B A x, so adapters visibly matter

# name, form, E, k, rank, alpha, scaling, expert0_importance, routing, dtypes, seed
CASES = [
    ("gelu_e4_k2_r3",            "gelu",   4, 2, 3, "2",  "sqrt",   "0.25", "topk", ("f64", "f32"), 101),
    ("gelu_e4_k1_r1",            "gelu",   4, 1, 1, "2",  "sqrt",   "0.25", "topk", ("f64", "f32"), 102),
    ("gelu_e4_k4_r8",            "gelu",   4, 4, 8, "4",  "sqrt",   "0.25", "topk", ("f64",),       103),
    ("gelu_e1_r3",               "gelu",   1, 1, 3, "16", "sqrt",   "1",    "topk", ("f64",),       104),
    ("gelu_e3_mean_r1",          "gelu",   3, 3, 1, "1",  "sqrt",   "0.5",  "mean", ("f64",),       105),
    ("gelu_e4_k2_linear_imp05_r8", "gelu", 4, 2, 8, "4",  "linear", "0.5",  "topk", ("f64", "f32"), 106),
    ("swiglu_e4_k2_r3",          "swiglu", 4, 2, 3, "16", "sqrt",   "0.4",  "topk", ("f64", "f32"), 107),
    ("swiglu_e2_k1_r8",          "swiglu", 2, 1, 8, "2",  "sqrt",   "0.5",  "topk", ("f64",),       108),
]

NP_DTYPES = {"f64": np.float64, "f32": np.float32}


def site_shapes(form):
    """(name, out, in) of every frozen linear that carries a LoRA per expert."""
    if form == "gelu":
        return [("fc", HID, D), ("proj", D, HID)]
    return [("gate", HID, D), ("up", HID, D), ("down", D, HID)]


def generate_inputs(cfg, seed):
    """Random float64 inputs for one case (torch generator seeded per case)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t = {}
    t["dy"] = randn(T, D)
    for name, out_f, in_f in site_shapes(cfg.form):
        t[f"{name}.weight"] = randn(out_f, in_f) / math.sqrt(in_f)
        if cfg.form == "gelu":
            t[f"{name}.bias"] = 0.5 * randn(out_f)
    s, r = cfg.scale, cfg.rank
    for e in range(cfg.experts):
        for name, out_f, in_f in site_shapes(cfg.form):
            t[f"experts.{e}.{name}.lora_A"] = randn(r, in_f) / math.sqrt(in_f)
            # Nonzero B (else the test is vacuous), sized so s * B A x has std ~ LORA_EFFECT.
            t[f"experts.{e}.{name}.lora_B"] = randn(out_f, r) * (LORA_EFFECT / (s * math.sqrt(r)))
    # x and router: redraw until every token has a clear top-k boundary and every expert is used.
    for _attempt in range(10000):
        x = randn(T, D)
        if not cfg.has_router:
            t["x"] = x
            return t
        wr = 1.5 * randn(cfg.experts, D) / math.sqrt(D)
        if routing_ok(x, wr, cfg):
            t["x"], t["router.weight"] = x, wr
            return t
    raise RuntimeError("could not draw well-separated routing")


def routing_margins(x, wr, k):
    logits = (x @ wr.t()).to(torch.float64)
    srt = torch.sort(logits, dim=-1, descending=True).values
    return srt[:, k - 1] - srt[:, k]


def routing_ok(x, wr, cfg):
    E, k = cfg.experts, cfg.top_k
    if k < E and bool((routing_margins(x, wr, k) <= TOPK_MARGIN).any()):
        return False
    chosen = torch.topk(x @ wr.t(), k, dim=-1).indices
    return len(set(chosen.reshape(-1).tolist())) == E  # every expert gets >= 1 token


def metadata_of(spec):
    _, form, E, k, r, alpha, scaling, imp, routing, _, _ = spec
    return {"form": form, "experts": str(E), "top_k": str(k), "rank": str(r), "alpha": alpha,
            "scaling": scaling, "expert0_importance": imp, "routing": routing}


def check_routing(inputs64, cfg, label):
    if not cfg.has_router:
        assert "router.weight" not in inputs64
        return
    x = torch.as_tensor(inputs64["x"])
    wr = torch.as_tensor(inputs64["router.weight"])
    if cfg.top_k < cfg.experts:
        m = routing_margins(x, wr, cfg.top_k)
        assert bool((m > TOPK_MARGIN).all()), f"{label}: top-k margin {m.min().item()} too small"
    chosen = torch.topk(x @ wr.t(), cfg.top_k, dim=-1).indices
    assert len(set(chosen.reshape(-1).tolist())) == cfg.experts, f"{label}: unused expert"


def check_shared_base(inputs64, cfg, label):
    """Naive per-expert MLP vs shared-base formula: y, lb_loss and all gradients."""
    outs = []
    for fwd in (rm.mixture_forward, rm.shared_base_forward):
        p = rm.build_params(inputs64, cfg, dtype=torch.float64)
        y, lb = fwd(p, cfg)
        loss = (y * p["dy"]).sum() + lb.sum()
        names = ["x"] + cfg.lora_names() + (["router.weight"] if cfg.has_router else [])
        grads = torch.autograd.grad(loss, [p[n] for n in names])
        outs.append([y.detach(), lb.detach()] + [gr.detach() for gr in grads])
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), \
            f"{label}: shared-base mismatch {(a - b).abs().max().item()}"


def check_gradcheck(inputs64, cfg, label):
    p = rm.build_params(inputs64, cfg, dtype=torch.float64)
    names = ["x"] + cfg.lora_names() + (["router.weight"] if cfg.has_router else [])
    leaves = [p[n] for n in names]

    def fn(*vals):
        q = dict(p)
        q.update(zip(names, vals))
        y, lb = rm.mixture_forward(q, cfg)
        return y, lb

    ok = torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert ok, f"{label}: gradcheck failed"


def check_float32_run(inputs32, expected32, cfg, label):
    """Running the reference itself in float32 must agree with the float64-derived golden values."""
    got = rm.run_forward_backward(inputs32, cfg, dtype=torch.float32)
    for name, want in expected32.items():
        g = got[name]
        scale = max(1.0, float(np.abs(want).max()))
        err = float(np.abs(g.astype(np.float64) - want.astype(np.float64)).max())
        assert err <= 2e-5 * scale, f"{label}: float32 run differs on {name} by {err}"


def write_checked(path, tensors, metadata):
    blob = sio.serialize(tensors, metadata)
    with open(path, "wb") as f:
        f.write(blob)
    back, md = sio.load_file(path)
    assert md == (metadata or {}), f"{path}: metadata round-trip"
    assert sorted(back) == sorted(tensors), f"{path}: names round-trip"
    for n, v in tensors.items():
        assert back[n].dtype == v.dtype and back[n].shape == v.shape, f"{path}: {n} dtype/shape"
        assert back[n].tobytes() == np.ascontiguousarray(v).tobytes(), f"{path}: {n} bytes"
    assert sio.serialize(back, md) == blob, f"{path}: re-serialisation differs"
    return len(blob)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "tests", "golden"))
    ap.add_argument("--no-gradcheck", action="store_true", help="skip the (slow-ish) gradchecks")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)

    names, total = [], 0
    for spec in CASES:
        base, dtypes, seed = spec[0], spec[9], spec[10]
        md = metadata_of(spec)
        cfg = rm.MixtureConfig.from_metadata(md)
        raw64 = generate_inputs(cfg, seed)
        for dt in dtypes:
            label = f"{base}_{dt}"
            npdt = NP_DTYPES[dt]
            inputs = {n: v.numpy().astype(npdt) for n, v in raw64.items()}
            inputs64 = {n: v.astype(np.float64) for n, v in inputs.items()}  # exact widening
            check_routing(inputs64, cfg, label)
            out64 = rm.run_forward_backward(inputs64, cfg, dtype=torch.float64)
            expected = {n: v.astype(npdt) for n, v in out64.items()}
            assert set(expected) == {"y", "dx", "lb_loss"} | {n + ".grad" for n in cfg.lora_names()} \
                | ({"router.weight.grad"} if cfg.has_router else set())
            for n in cfg.lora_names():
                assert np.abs(expected[n + ".grad"]).max() > 0, f"{label}: zero gradient for {n}"
            check_shared_base(inputs64, cfg, label)
            if dt == "f64" and not args.no_gradcheck:
                check_gradcheck(inputs64, cfg, label)
            if dt == "f32":
                check_float32_run(inputs, expected, cfg, label)
            total += write_checked(os.path.join(args.out, f"{label}.safetensors"), inputs, md)
            total += write_checked(os.path.join(args.out, f"{label}.expected.safetensors"),
                                   expected, md)
            names.append(label)
            print(f"{label}: lb_loss={float(out64['lb_loss'][0]):.6f} "
                  f"|y|max={float(np.abs(out64['y']).max()):.3f}")

    with open(os.path.join(args.out, "cases.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    # Remove golden files of cases that no longer exist.
    keep = {f"{n}.safetensors" for n in names} | {f"{n}.expected.safetensors" for n in names}
    for fn in sorted(os.listdir(args.out)):
        if fn.endswith(".safetensors") and fn not in keep:
            os.remove(os.path.join(args.out, fn))
    print(f"{len(names)} cases, {total} bytes of safetensors in {args.out}")


if __name__ == "__main__":
    main()
