"""Naive PyTorch reference semantics for a comigs mixture-of-LoRA-experts MLP layer.

This mirrors the structure of the CoMiGS authors' code: every selected expert runs the *whole* MLP
(frozen base recomputed per expert) with its own LoRA adapters, and the outputs are combined with the
router's gate weights.  Gradients come from torch autograd.  It is deliberately simple and slow; it is
the ground truth for the golden files (tools/make_golden.py) and the baseline for speed comparisons.

Semantics (see /work/shared/design/method.md and tests/golden/README.md):
  * logits = x @ router.weight^T  [T, E]; probs = softmax(logits) over all E.
  * routing=topk, E > 1, k >= 2: top-k experts by logit, gates = softmax over the selected logits.
  * routing=topk, E > 1, k == 1: argmax expert, gate = probs[argmax] (unnormalised, < 1).
  * E == 1: expert 0 with gate 1, no router.  routing=mean: all experts, gate 1/E, no router.
  * lb_loss (topk, E > 1 only, else 0) = sum_e P_e f_e / t_e with P_e = mean_t probs[t, e],
    f_e = (#(token, slot) assignments to e) / (T k) (no gradient), t_0 = expert0_importance,
    t_e = (1 - t_0) / (E - 1).
  * gelu expert:   u = gelu_tanh(x W1^T + b1 + s (x A1^T) B1^T);  out = u W2^T + b2 + s (u A2^T) B2^T
  * swiglu expert: a = silu(x Wg^T + s..) * (x Wu^T + s..);       out = a Wd^T + s (a Ad^T) Bd^T
  * s = alpha / sqrt(r) (scaling=sqrt) or alpha / r (scaling=linear).  Dropout 0.

Usage from another script:
    cfg = MixtureConfig.from_metadata(metadata)
    out = run_forward_backward(tensors, cfg, dtype=torch.float64)   # dict of numpy arrays
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BASE_NAMES = {
    "gelu": ("fc", "proj"),
    "swiglu": ("gate", "up", "down"),
}


@dataclass(frozen=True)
class MixtureConfig:
    form: str  # "gelu" | "swiglu"
    experts: int
    top_k: int
    rank: int
    alpha: float
    scaling: str  # "sqrt" | "linear"
    expert0_importance: float
    routing: str  # "topk" | "mean"

    def __post_init__(self):
        if self.form not in BASE_NAMES:
            raise ValueError(f"unknown form {self.form!r}")
        if self.scaling not in ("sqrt", "linear"):
            raise ValueError(f"unknown scaling {self.scaling!r}")
        if self.routing not in ("topk", "mean"):
            raise ValueError(f"unknown routing {self.routing!r}")
        if self.experts < 1 or self.rank < 1:
            raise ValueError("experts and rank must be >= 1")
        if self.routing == "topk" and not (1 <= self.top_k <= self.experts):
            raise ValueError("top_k must be in [1, experts]")

    @property
    def scale(self):
        return self.alpha / (math.sqrt(self.rank) if self.scaling == "sqrt" else self.rank)

    @property
    def has_router(self):
        return self.routing == "topk" and self.experts > 1

    def lora_sites(self):
        return BASE_NAMES[self.form]

    def lora_names(self):
        return [f"experts.{e}.{site}.{ab}" for e in range(self.experts)
                for site in self.lora_sites() for ab in ("lora_A", "lora_B")]

    def targets(self):
        """Target shares t_e of the load-balancing loss (python floats)."""
        E = self.experts
        if E == 1:
            return [1.0]
        t0 = self.expert0_importance
        return [t0] + [(1.0 - t0) / (E - 1)] * (E - 1)

    @staticmethod
    def from_metadata(md):
        return MixtureConfig(
            form=md["form"], experts=int(md["experts"]), top_k=int(md["top_k"]),
            rank=int(md["rank"]), alpha=float(md["alpha"]), scaling=md["scaling"],
            expert0_importance=float(md["expert0_importance"]), routing=md["routing"])


def build_params(tensors, cfg, dtype=torch.float64, device="cpu"):
    """Turn a name -> array mapping (numpy or torch) into torch leaf tensors.

    LoRA tensors, router.weight and x get requires_grad=True; base weights and dy do not.
    """
    trainable = set(cfg.lora_names()) | {"x"}
    if cfg.has_router:
        trainable.add("router.weight")
    params = {}
    for name, value in tensors.items():
        t = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
        t = t.detach().to(device=device, dtype=dtype).clone()
        t.requires_grad_(name in trainable)
        params[name] = t
    missing = [n for n in trainable if n not in params]
    if missing:
        raise KeyError(f"missing tensors: {missing}")
    return params


def lora_linear(x, weight, bias, lora_A, lora_B, s):
    """W x + b + s B (A x) for row-vector inputs x [N, in]."""
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y + s * ((x @ lora_A.t()) @ lora_B.t())


def expert_forward(x, p, e, cfg):
    """Full MLP of expert e (frozen base recomputed here, as in the authors' code)."""
    s = cfg.scale
    pre = f"experts.{e}."
    if cfg.form == "gelu":
        h = lora_linear(x, p["fc.weight"], p["fc.bias"],
                        p[pre + "fc.lora_A"], p[pre + "fc.lora_B"], s)
        u = F.gelu(h, approximate="tanh")
        return lora_linear(u, p["proj.weight"], p["proj.bias"],
                           p[pre + "proj.lora_A"], p[pre + "proj.lora_B"], s)
    g = lora_linear(x, p["gate.weight"], None, p[pre + "gate.lora_A"], p[pre + "gate.lora_B"], s)
    u = lora_linear(x, p["up.weight"], None, p[pre + "up.lora_A"], p[pre + "up.lora_B"], s)
    a = F.silu(g) * u
    return lora_linear(a, p["down.weight"], None, p[pre + "down.lora_A"], p[pre + "down.lora_B"], s)


def route(x, p, cfg):
    """Return (indices [T, k] long, gates [T, k], lb_loss [1]).

    For E == 1 and routing=mean the indices are all experts and the gates are constants.
    """
    T = x.shape[0]
    E = cfg.experts
    if not cfg.has_router:
        idx = torch.arange(E, device=x.device).expand(T, E)
        gates = torch.full((T, E), 1.0 / E, dtype=x.dtype, device=x.device)
        return idx, gates, torch.zeros(1, dtype=x.dtype, device=x.device)
    k = cfg.top_k
    logits = x @ p["router.weight"].t()
    probs = torch.softmax(logits, dim=-1)
    top_vals, idx = torch.topk(logits, k, dim=-1)
    if k >= 2:
        gates = torch.softmax(top_vals, dim=-1)
    else:
        gates = probs.gather(1, idx)
    # Load balancing: P differentiable, f counted without gradient.
    P = probs.mean(dim=0)
    with torch.no_grad():
        counts = torch.zeros(E, dtype=x.dtype, device=x.device)
        counts.index_add_(0, idx.reshape(-1), torch.ones(T * k, dtype=x.dtype, device=x.device))
        f = counts / (T * k)
    t = torch.tensor(cfg.targets(), dtype=x.dtype, device=x.device)
    lb = (P * f / t).sum().reshape(1)
    return idx, gates, lb


def mixture_forward(p, cfg):
    """Naive forward: returns (y [T, d], lb_loss [1])."""
    x = p["x"]
    idx, gates, lb = route(x, p, cfg)
    y = torch.zeros_like(x)
    for e in range(cfg.experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        out = expert_forward(x[tok], p, e, cfg)  # whole MLP for the tokens routed to e
        y = y.index_add(0, tok, gates[tok, slot].unsqueeze(1) * out)
    return y, lb


def forward_backward(p, cfg):
    """Forward + backward of loss = sum(y * dy) + lb_loss on built params.

    Returns a dict of torch tensors: y, lb_loss, dx and '<name>.grad' for every LoRA tensor and
    router.weight (when present).
    """
    y, lb = mixture_forward(p, cfg)
    loss = (y * p["dy"]).sum() + lb.sum()
    names = ["x"] + cfg.lora_names() + (["router.weight"] if cfg.has_router else [])
    grads = torch.autograd.grad(loss, [p[n] for n in names], allow_unused=True)
    out = {"y": y.detach(), "lb_loss": lb.detach()}
    for n, g in zip(names, grads):
        if g is None:
            g = torch.zeros_like(p[n])
        out["dx" if n == "x" else n + ".grad"] = g.detach()
    return out


def run_forward_backward(tensors, cfg, dtype=torch.float64, device="cpu"):
    """Build the layer from a name -> array mapping and run forward/backward; numpy outputs."""
    p = build_params(tensors, cfg, dtype=dtype, device=device)
    return {k: v.cpu().numpy() for k, v in forward_backward(p, cfg).items()}


# ---------------------------------------------------------------------------------------------
# Independent second computation ("shared base"): frozen base GEMMs done once, per-expert low-rank
# corrections added, gates built as a dense [T, E] matrix via sorting (not torch.topk).  Used only to
# cross-check the naive path.
# ---------------------------------------------------------------------------------------------

def dense_gates_shared(x, p, cfg):
    T, E = x.shape[0], cfg.experts
    if not cfg.has_router:
        return torch.full((T, E), 1.0 / E, dtype=x.dtype), torch.zeros(1, dtype=x.dtype)
    k = cfg.top_k
    logits = torch.einsum("td,ed->te", x, p["router.weight"])
    order = torch.argsort(logits, dim=-1, descending=True)
    mask = torch.zeros(T, E, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    ex = torch.exp(shifted)
    full = ex / ex.sum(dim=-1, keepdim=True)
    if k == 1:
        G = torch.where(mask, full, torch.zeros_like(full))
    else:
        exm = torch.where(mask, ex, torch.zeros_like(ex))
        G = exm / exm.sum(dim=-1, keepdim=True)
    f = mask.to(x.dtype).sum(dim=0) / (T * k)
    lb = sum(full[:, e].mean() * f[e] / cfg.targets()[e] for e in range(E))
    return G, torch.as_tensor(lb, dtype=x.dtype).reshape(1)


def _gelu_tanh_formula(h):
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * h * (1.0 + torch.tanh(c * (h + 0.044715 * h * h * h)))


def shared_base_forward(p, cfg):
    x = p["x"]
    s = cfg.scale
    G, lb = dense_gates_shared(x, p, cfg)
    E = cfg.experts
    if cfg.form == "gelu":
        H = torch.addmm(p["fc.bias"], x, p["fc.weight"].t())  # once for all experts
        U = torch.zeros(x.shape[0], p["fc.weight"].shape[0], dtype=x.dtype)
        low = torch.zeros_like(x)
        for e in range(E):
            pre = f"experts.{e}."
            u = _gelu_tanh_formula(H + s * (x @ p[pre + "fc.lora_A"].t()) @ p[pre + "fc.lora_B"].t())
            U = U + G[:, e:e + 1] * u
            low = low + G[:, e:e + 1] * (s * (u @ p[pre + "proj.lora_A"].t()) @ p[pre + "proj.lora_B"].t())
        return U @ p["proj.weight"].t() + G.sum(1, keepdim=True) * p["proj.bias"] + low, lb
    Hg = x @ p["gate.weight"].t()
    Hu = x @ p["up.weight"].t()
    A = torch.zeros_like(Hg)
    low = torch.zeros_like(x)
    for e in range(E):
        pre = f"experts.{e}."
        g = Hg + s * (x @ p[pre + "gate.lora_A"].t()) @ p[pre + "gate.lora_B"].t()
        u = Hu + s * (x @ p[pre + "up.lora_A"].t()) @ p[pre + "up.lora_B"].t()
        a = g * torch.sigmoid(g) * u
        A = A + G[:, e:e + 1] * a
        low = low + G[:, e:e + 1] * (s * (a @ p[pre + "down.lora_A"].t()) @ p[pre + "down.lora_B"].t())
    return A @ p["down.weight"].t() + low, lb
