#!/usr/bin/python3
"""Whole-model speed and memory of the CoMiGS reference semantics in PyTorch (the baseline of issue 24).

An independent PyTorch model with the authors' whole-model structure, at real shapes with random weights:
  * GPT-2-124M (vocab 50257, d 768, 12 layers, 12 heads, GELU-tanh MLP 3072, tied head), or
  * SmolLM2-135M (vocab 49152, d 576, 30 layers, 9 heads / 3 KV heads, head_dim 64, SwiGLU MLP 1536,
    RMSNorm, rotate-half RoPE theta 100000, tied head);
  * every MLP a mixture of E LoRA experts (default 2, top-2, rank 8, alpha 16, scaling alpha/sqrt(r)) with
    a per-token router (linear d -> E, no bias) and the load-balancing loss (weight 0.01); as the reference
    code does, each expert holds its own copy of the frozen MLP and every selected expert runs the whole
    MLP on the tokens routed to it;
  * plain LoRA rank 8 on attention (GPT-2: c_attn and c_proj; Llama: q, k, v, o);
  * the frozen base has requires_grad=False; AdamW (betas 0.9/0.95, weight decay 0.01) steps LoRA and
    routers; cross-entropy over the full vocabulary.

Modes (one per process, so that /usr/bin/time -v reports each one's peak memory):
  step    one fine-tuning step (forward, backward, AdamW), batch B x T tokens
  fwd     evaluation forward (no autograd), B x T tokens
  decode  one new token with a KV cache holding `--context` tokens, batch 1

Prints one JSON line: {"mode", "shape", "seconds" (median), "runs", "tokens_per_second", ...}.

Usage (Debian's torch lives in /usr/bin/python3; tune it as a user would):
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp LD_PRELOAD=libtcmalloc_minimal.so.4 \
    /usr/bin/python3 tools/reference_model.py --shape gpt2_124m --mode step --threads 2 --reps 3
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {
    "gpt2_124m": dict(arch="gpt2", vocab=50257, n_ctx=1024, d=768, layers=12, heads=12, kv_heads=12,
                      head_dim=64, hidden=3072),
    "smollm2_135m": dict(arch="llama", vocab=49152, n_ctx=2048, d=576, layers=30, heads=9, kv_heads=3,
                         head_dim=64, hidden=1536, rope_theta=100000.0, eps=1e-5),
}


class LoraLinear(nn.Module):
    """y = x W^T + b + s (x A^T) B^T with W, b frozen; A [r, in], B [out, r]."""

    def __init__(self, d_in, d_out, rank, alpha, bias=True, base=None):
        super().__init__()
        self.base = base if base is not None else nn.Linear(d_in, d_out, bias=bias)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(rank, d_in).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in)))
        # B random rather than 0 so that the timed work is the real work (nothing is skipped for zeros).
        self.B = nn.Parameter(torch.randn(d_out, rank) * 0.01)
        self.scale = alpha / math.sqrt(rank)

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.A), self.B)


class GeluExpert(nn.Module):
    def __init__(self, d, hidden, rank, alpha):
        super().__init__()
        self.fc = LoraLinear(d, hidden, rank, alpha)
        self.proj = LoraLinear(hidden, d, rank, alpha)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SwigluExpert(nn.Module):
    def __init__(self, d, hidden, rank, alpha):
        super().__init__()
        self.gate = LoraLinear(d, hidden, rank, alpha, bias=False)
        self.up = LoraLinear(d, hidden, rank, alpha, bias=False)
        self.down = LoraLinear(hidden, d, rank, alpha, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MixtureMlp(nn.Module):
    """The reference's MoE block: E experts (each a whole MLP copy with its LoRA), top-k router.

    Gates as comigs computes them (tools/reference_mixture.py): k >= 2 softmax over the top-k logits;
    k = 1 the full softmax's top probability (Switch style); E = 1 no router, gate 1 (plain LoRA)."""

    def __init__(self, expert_cls, d, hidden, experts, top_k, rank, alpha):
        super().__init__()
        self.experts = nn.ModuleList([expert_cls(d, hidden, rank, alpha) for _ in range(experts)])
        self.router = nn.Linear(d, experts, bias=False) if experts > 1 else None
        if self.router is not None:
            nn.init.normal_(self.router.weight, std=0.02)
        self.top_k = min(top_k, experts)
        self.lb_loss = torch.zeros(())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        E = len(self.experts)
        if self.router is None:
            self.lb_loss = torch.zeros((), dtype=x.dtype)
            return self.experts[0](x).reshape(shape)
        logits = self.router(x)
        probs = F.softmax(logits, dim=-1)
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        gates = F.softmax(top_logits, dim=-1) if self.top_k > 1 else probs.gather(1, top_idx)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(top_idx == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            out.index_add_(0, rows, gates[rows, slot, None] * expert(x[rows]))
        # Switch-style balancing loss with uniform targets: E * sum_e P_e f_e.
        f = torch.bincount(top_idx.reshape(-1), minlength=E).to(x.dtype) / top_idx.numel()
        self.lb_loss = E * torch.sum(probs.mean(0) * f)
        return out.reshape(shape)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, rank, alpha):
        super().__init__()
        self.cfg = cfg
        d, hd, H, KV = cfg["d"], cfg["head_dim"], cfg["heads"], cfg["kv_heads"]
        if cfg["arch"] == "gpt2":
            self.c_attn = LoraLinear(d, 3 * d, rank, alpha)
            self.c_proj = LoraLinear(d, d, rank, alpha)
        else:
            self.q = LoraLinear(d, H * hd, rank, alpha, bias=False)
            self.k = LoraLinear(d, KV * hd, rank, alpha, bias=False)
            self.v = LoraLinear(d, KV * hd, rank, alpha, bias=False)
            self.o = LoraLinear(H * hd, d, rank, alpha, bias=False)

    def forward(self, x, pos0=0, cache=None, rope=None):
        cfg = self.cfg
        Bn, T, d = x.shape
        H, KV, hd = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        if cfg["arch"] == "gpt2":
            q, k, v = self.c_attn(x).split(d, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(Bn, T, H, hd).transpose(1, 2)
        k = k.view(Bn, T, KV, hd).transpose(1, 2)
        v = v.view(Bn, T, KV, hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0][pos0:pos0 + T], rope[1][pos0:pos0 + T]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            if cache.get("k") is not None:
                k = torch.cat((cache["k"], k), dim=2)
                v = torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        if KV != H:
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
        S = k.shape[2]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        if T > 1:
            mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
            att = att.masked_fill(~mask, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).reshape(Bn, T, H * hd)
        return self.c_proj(y) if cfg["arch"] == "gpt2" else self.o(y)


class Block(nn.Module):
    def __init__(self, cfg, experts, top_k, rank, alpha):
        super().__init__()
        self.cfg = cfg
        d = cfg["d"]
        self.attn = Attention(cfg, rank, alpha)
        if cfg["arch"] == "gpt2":
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.mlp = MixtureMlp(GeluExpert, d, cfg["hidden"], experts, top_k, rank, alpha)
        else:
            self.ln_1 = nn.Parameter(torch.ones(d), requires_grad=False)
            self.ln_2 = nn.Parameter(torch.ones(d), requires_grad=False)
            self.mlp = MixtureMlp(SwigluExpert, d, cfg["hidden"], experts, top_k, rank, alpha)

    def norm(self, which, x):
        if self.cfg["arch"] == "gpt2":
            return which(x)
        return rms_norm(x, which, self.cfg["eps"])

    def forward(self, x, pos0=0, cache=None, rope=None):
        x = x + self.attn(self.norm(self.ln_1, x), pos0, cache, rope)
        return x + self.mlp(self.norm(self.ln_2, x))


class Model(nn.Module):
    def __init__(self, cfg, experts, top_k, rank, alpha):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg["vocab"], cfg["d"])
        nn.init.normal_(self.wte.weight, std=0.02)
        if cfg["arch"] == "gpt2":
            self.wpe = nn.Embedding(cfg["n_ctx"], cfg["d"])
            self.ln_f = nn.LayerNorm(cfg["d"])
            self.rope = None
        else:
            self.ln_f = nn.Parameter(torch.ones(cfg["d"]))
            hd = cfg["head_dim"]
            inv = cfg["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
            ang = torch.arange(cfg["n_ctx"], dtype=torch.float32)[:, None] * inv[None, :]
            emb = torch.cat((ang, ang), dim=-1)
            self.rope = (emb.cos(), emb.sin())
        self.blocks = nn.ModuleList([Block(cfg, experts, top_k, rank, alpha) for _ in range(cfg["layers"])])
        for name, p in self.named_parameters():  # the frozen base: everything but LoRA and routers
            if not (name.endswith(".A") or name.endswith(".B") or ".router." in name):
                p.requires_grad_(False)

    def forward(self, idx, pos0=0, caches=None):
        Bn, T = idx.shape
        x = self.wte(idx)
        if self.cfg["arch"] == "gpt2":
            x = x + self.wpe(torch.arange(pos0, pos0 + T))
        for i, block in enumerate(self.blocks):
            x = block(x, pos0, None if caches is None else caches[i], self.rope)
        x = self.ln_f(x) if self.cfg["arch"] == "gpt2" else rms_norm(x, self.ln_f, self.cfg["eps"])
        return F.linear(x, self.wte.weight)  # tied head

    def lb_loss(self):
        return sum(b.mlp.lb_loss for b in self.blocks) / len(self.blocks)


def check_against_layer_reference():
    """The MLP mixture of this model against tools/reference_mixture.py (comigs' layer semantics) in
    float64: forward, balancing loss, input and parameter gradients, for both MLP forms, k = 1 and 2 and
    the plain-LoRA case E = 1. Returns the largest relative difference seen (raises past 1e-10)."""
    import reference_mixture as ref

    worst = 0.0
    torch.manual_seed(3)
    for form, E, k in (("gelu", 2, 2), ("swiglu", 3, 2), ("gelu", 3, 1), ("swiglu", 1, 1)):
        d, h, r, T = 12, 20, 4, 9
        expert_cls = GeluExpert if form == "gelu" else SwigluExpert
        mix = MixtureMlp(expert_cls, d, h, E, k, r, alpha=16.0).double()
        cfg = ref.MixtureConfig(form=form, experts=E, top_k=k, rank=r, alpha=16.0, scaling="sqrt",
                                expert0_importance=1.0 / E, routing="topk")
        shapes = ((("fc.weight", (h, d)), ("fc.bias", (h,)), ("proj.weight", (d, h)), ("proj.bias", (d,)))
                  if form == "gelu" else (("gate.weight", (h, d)), ("up.weight", (h, d)), ("down.weight", (d, h))))
        base = {n: torch.randn(*shape, dtype=torch.float64) * 0.3 for n, shape in shapes}
        tensors = dict(base, x=torch.randn(T, d, dtype=torch.float64), dy=torch.randn(T, d, dtype=torch.float64))
        if E > 1:
            tensors["router.weight"] = torch.randn(E, d, dtype=torch.float64)
        with torch.no_grad():
            if mix.router is not None:
                mix.router.weight.copy_(tensors["router.weight"])
            for e, expert in enumerate(mix.experts):
                for site in cfg.lora_sites():
                    lin = getattr(expert, site)
                    lin.base.weight.copy_(base[site + ".weight"])
                    if lin.base.bias is not None:
                        lin.base.bias.copy_(base[site + ".bias"])
                    lin.A.copy_(torch.randn_like(lin.A))
                    lin.B.copy_(torch.randn_like(lin.B) * 0.5)
                    tensors[f"experts.{e}.{site}.lora_A"] = lin.A.detach().clone()
                    tensors[f"experts.{e}.{site}.lora_B"] = lin.B.detach().clone()
        want = ref.run_forward_backward(tensors, cfg, dtype=torch.float64)
        x = tensors["x"].clone().requires_grad_(True)
        y = mix(x)
        loss = (y * tensors["dy"]).sum() + mix.lb_loss
        loss.backward()
        got = {"y": y.detach(), "lb_loss": mix.lb_loss.detach().reshape(1), "dx": x.grad}
        if mix.router is not None:
            got["router.weight.grad"] = mix.router.weight.grad
        for e, expert in enumerate(mix.experts):
            for site in cfg.lora_sites():
                lin = getattr(expert, site)
                got[f"experts.{e}.{site}.lora_A.grad"] = lin.A.grad
                got[f"experts.{e}.{site}.lora_B.grad"] = lin.B.grad
        for name, value in want.items():
            g = got[name].numpy()
            scale = max(1.0, float(abs(value).max()))
            diff = float(abs(g - value).max()) / scale
            worst = max(worst, diff)
            if diff > 1e-10:
                raise AssertionError(f"{form} E={E} k={k}: {name} differs from reference_mixture by {diff:.3g}")
    return worst


def timed(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2_124m")
    ap.add_argument("--mode", choices=("step", "fwd", "decode"), default="step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=512, help="KV cache length for --mode decode")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="check the mixture block against tools/reference_mixture.py (comigs' layer semantics) "
                         "in float64 and exit")
    args = ap.parse_args()
    if args.check:
        worst = check_against_layer_reference()
        print(json.dumps({"check": "mixture block vs reference_mixture.py", "max_rel_diff": worst, "ok": True}))
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = SHAPES[args.shape]
    model = Model(cfg, args.experts, args.top_k, args.rank, alpha=16.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    gen = torch.Generator().manual_seed(args.seed + 1)

    if args.mode == "step":
        opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
        idx = torch.randint(cfg["vocab"], (args.batch, args.tokens + 1), generator=gen)

        def step():
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, cfg["vocab"]), idx[:, 1:].reshape(-1))
            loss = loss + 0.01 * model.lb_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times = timed(step, args.reps, args.warmup)
        tokens = args.batch * args.tokens
    elif args.mode == "fwd":
        idx = torch.randint(cfg["vocab"], (args.batch, args.tokens), generator=gen)

        def fwd():
            with torch.no_grad():
                model(idx)

        times = timed(fwd, args.reps, args.warmup)
        tokens = args.batch * args.tokens
    else:
        prompt = torch.randint(cfg["vocab"], (1, args.context), generator=gen)
        with torch.no_grad():
            caches = [dict() for _ in model.blocks]
            model(prompt, 0, caches)
            nxt = torch.randint(cfg["vocab"], (1, 1), generator=gen)

            def decode():
                # one new token at position `context`; the cache is cut back after each so every run
                # sees the same context length
                saved = [(c["k"], c["v"]) for c in caches]
                model(nxt, args.context, caches)
                for c, (k, v) in zip(caches, saved):
                    c["k"], c["v"] = k, v

            times = timed(decode, max(args.reps, 5), args.warmup)
        tokens = 1

    med = statistics.median(times)
    print(json.dumps({
        "mode": args.mode, "shape": args.shape, "threads": args.threads, "seconds": med, "runs": times,
        "tokens_per_second": tokens / med, "batch": args.batch, "tokens": args.tokens,
        "context": args.context if args.mode == "decode" else None, "experts": args.experts,
        "top_k": args.top_k, "rank": args.rank, "trainable_parameters": n_trainable,
        "torch": torch.__version__, "blas": blas_name(),
    }))


def blas_name():
    """The BLAS library this process really loaded (the tuned setup needs OpenBLAS with OpenMP)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.lower()}
        return sorted(libs)
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit(main())
