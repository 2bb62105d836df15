"""Tiny random Hugging Face model folders and what an independent PyTorch implementation computes on them.

For every case below this writes, under tests/golden/models/<case>/:
  * model/            a Hugging Face model folder: config.json + model.safetensors (F32, F16 or BF16), or shards
                      + model.safetensors.index.json. GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM.
  * inputs.safetensors   tokens / targets [B, T] (I64); attention LoRA `<prefix>lora_A` [r, in], `lora_B`
                      [out, r] (all nonzero) for every adapted projection; a mixture of LoRA experts on every
                      MLP: `<mlp prefix>router.weight`, `<mlp prefix>experts.{e}.{linear}.lora_A/B`. Metadata:
                      lora_rank, lora_alpha, lora_scaling, experts, top_k, mix_rank, mix_alpha, mix_scaling,
                      lb_weight.
  * expected.safetensors (F64)
        base.logits [B*T, V]   the plain model (no adapters, dense MLPs)
        logits [B*T, V], ce [], aux []   the adapted model; aux = lb_weight * sum of the layers' balancing losses
        <tensor>.grad           d(ce + aux)/d(tensor) for every adapter tensor of inputs.safetensors

The model code here is written from transformers' semantics (GPT2LMHeadModel, LlamaForCausalLM,
Qwen2ForCausalLM as of transformers 4.4x; `transformers` itself is not installed here), not from
comigs: Conv1D weights [in, out]; LayerNorm eps 1e-5; gelu_new; RMSNorm as w * (x * rsqrt(mean(x^2) + eps));
rotate-half RoPE with inv_freq and angles in fp32 and cos/sin rounded to fp32, then cast to the compute dtype;
llama3 rope scaling;
repeat_kv for GQA; softmax attention with a causal mask. The mixture MLP is tools/reference_mixture.py
(naive: each selected expert runs the whole MLP). Everything is computed in float64 from the stored
values (BF16, F16 and F32 weights widened exactly).

  * model.gguf (Llama and Qwen2 cases) the same model as llama.cpp's converter writes it: llama.cpp's tensor
                      names, dims ne0 first, the rows of attn_q / attn_k of llama models permuted for GGML's
                      pairwise RoPE (w.reshape(heads, 2, rows / heads / 2, in).swapaxes(1, 2)), llama3 scaling as
                      the rope_freqs tensor, 1-D tensors in F32. Cases with a Q8_0 / Q4_0 tag exist only as
                      model.gguf: their matrices are quantized by tools/quant_reference.py (ggml's reference
                      block functions) and the reference computes with the dequantized values; those cases
                      carry a byte-level BPE tokenizer in the GGUF metadata and the same tokenizer as
                      tokenizer.json beside it. gguf_cases.txt lists every case with a model.gguf.

Run from the repository root with Debian's torch:  /usr/bin/python3 tools/make_model_golden.py
Output is deterministic (fixed seeds, sorted tensor names); the script checks top-k routing margins.
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf_golden as gg  # noqa: E402
import quant_reference as qr  # noqa: E402
import reference_mixture as rm  # noqa: E402
import safetensors_io as st  # noqa: E402

OUT = os.path.join("tests", "golden", "models")
DT = torch.float64


# ----------------------------------------------------------------------------------------------------
# Writing


def bf16_round(t):
    """Values as a BF16 file stores them (round to nearest even), back in float64."""
    return t.to(torch.bfloat16).to(DT)


def f16_round(t):
    """Values as an F16 file stores them (IEEE half, round to nearest even), back in float64."""
    return t.to(torch.float16).to(DT)


def write_safetensors(path, tensors, metadata=None):
    """tensors: name -> (torch tensor, tag) with tag in F32 / BF16 / F16 / F64 / I64."""
    st.save_file({k: (v.to(torch.bfloat16) if tag == "BF16" else
                      v.to(torch.float16) if tag == "F16" else
                      v.to(torch.float32) if tag == "F32" else
                      v.to(torch.int64) if tag == "I64" else v.to(torch.float64))
                  for k, (v, tag) in tensors.items()}, path, metadata)


def write_model(folder, weights, tag, config, shards=1):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    names = sorted(weights)
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), {n: (weights[n], tag) for n in names},
                          {"format": "pt"})
        return
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(folder, file), {n: (weights[n], tag) for n in part}, {"format": "pt"})
        for n in part:
            weight_map[n] = file
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------------------------------------------
# Shared pieces


def lora(x, A, B, s):
    return s * ((x @ A.t()) @ B.t())


def causal_softmax_attention(q, k, v):
    """q [B, H, T, hd], k, v [B, H, T, hd] -> [B, H, T, hd]."""
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def mixture(x, base, adapters, prefix, mix):
    """The reference mixture on rows x [N, d]: returns (y, lb)."""
    p = dict(base)
    p["x"] = x
    for name, t in adapters.items():
        if name.startswith(prefix):
            p[name[len(prefix):]] = t
    return rm.mixture_forward(p, mix)


def check_margins(x, router, k, what):
    """Every row's k-th and (k+1)-th router logits differ by > 1e-3 (no top-k ties to flip in fp32)."""
    logits = (x @ router.t()).detach()
    if logits.shape[1] <= k:
        return
    top = torch.topk(logits, k + 1, dim=-1).values
    gap = (top[:, k - 1] - top[:, k]).min().item()
    assert gap > 1e-3, f"{what}: top-k margin {gap}"


# ----------------------------------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel)


def gpt2_weights(c, gen):
    d, V, n_ctx, h = c["n_embd"], c["vocab_size"], c["n_positions"], 4 * c["n_embd"]
    w = {"wte.weight": torch.randn(V, d, generator=gen, dtype=DT) * 0.5,
         "wpe.weight": torch.randn(n_ctx, d, generator=gen, dtype=DT) * 0.2,
         "ln_f.weight": 1 + 0.1 * torch.randn(d, generator=gen, dtype=DT),
         "ln_f.bias": 0.1 * torch.randn(d, generator=gen, dtype=DT)}
    for i in range(c["n_layer"]):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            w[p + ln + ".weight"] = 1 + 0.1 * torch.randn(d, generator=gen, dtype=DT)
            w[p + ln + ".bias"] = 0.1 * torch.randn(d, generator=gen, dtype=DT)
        for name, (i_, o_) in {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, h),
                               "mlp.c_proj": (h, d)}.items():
            w[p + name + ".weight"] = torch.randn(i_, o_, generator=gen, dtype=DT) * 0.3  # Conv1D [in, out]
            w[p + name + ".bias"] = torch.randn(o_, generator=gen, dtype=DT) * 0.1
    return w


def layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5)


def gpt2_forward(c, w, tokens, adapters=None, lora_s=0.0, mix=None, lb_weight=0.0):
    """Returns (logits [B*T, V], sum of the layers' balancing losses times lb_weight)."""
    B, T = tokens.shape
    d, H = c["n_embd"], c["n_head"]
    hd = d // H
    x = w["wte.weight"][tokens] + w["wpe.weight"][torch.arange(T)][None]
    aux = torch.zeros((), dtype=DT)
    for i in range(c["n_layer"]):
        p = f"h.{i}."
        a = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = a @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        if adapters:
            qkv = qkv + lora(a, adapters[p + "attn.c_attn.lora_A"], adapters[p + "attn.c_attn.lora_B"], lora_s)
        q, k, v = qkv.split(d, dim=-1)
        heads = lambda t: t.view(B, T, H, hd).transpose(1, 2)  # noqa: E731
        o = causal_softmax_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(B, T, d)
        out = o @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        if adapters:
            out = out + lora(o, adapters[p + "attn.c_proj.lora_A"], adapters[p + "attn.c_proj.lora_B"], lora_s)
        x = x + out
        m = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        if mix is None:
            y = F.gelu(m @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], approximate="tanh")
            y = y @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
        else:
            base = {"fc.weight": w[p + "mlp.c_fc.weight"].t(), "fc.bias": w[p + "mlp.c_fc.bias"],
                    "proj.weight": w[p + "mlp.c_proj.weight"].t(), "proj.bias": w[p + "mlp.c_proj.bias"]}
            flat = m.reshape(B * T, d)
            check_margins(flat, adapters[p + "mlp.router.weight"], mix.top_k, p)
            y, lb = mixture(flat, base, adapters, p + "mlp.", mix)
            y = y.view(B, T, d)
            aux = aux + lb_weight * lb.sum()
        x = x + y
        # (in place of: x = x + mlp(m))
    x = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"])
    return (x @ w["wte.weight"].t()).reshape(B * T, -1), aux


# ----------------------------------------------------------------------------------------------------
# Llama / Qwen2


def llama_weights(c, gen):
    d, V, h = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // H
    qwen = c["model_type"] == "qwen2"
    w = {"model.embed_tokens.weight": torch.randn(V, d, generator=gen, dtype=DT),
         "model.norm.weight": 1 + 0.1 * torch.randn(d, generator=gen, dtype=DT)}
    if not c["tie_word_embeddings"]:
        w["lm_head.weight"] = torch.randn(V, d, generator=gen, dtype=DT) * 0.3
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(d, generator=gen, dtype=DT)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(d, generator=gen, dtype=DT)
        for name, (o_, i_) in {"self_attn.q_proj": (H * hd, d), "self_attn.k_proj": (KV * hd, d),
                               "self_attn.v_proj": (KV * hd, d), "self_attn.o_proj": (d, H * hd),
                               "mlp.gate_proj": (h, d), "mlp.up_proj": (h, d), "mlp.down_proj": (d, h)}.items():
            w[p + name + ".weight"] = torch.randn(o_, i_, generator=gen, dtype=DT) * 0.3  # nn.Linear [out, in]
        if qwen:
            for name, o_ in {"self_attn.q_proj": H * hd, "self_attn.k_proj": KV * hd, "self_attn.v_proj": KV * hd}.items():
                w[p + name + ".bias"] = torch.randn(o_, generator=gen, dtype=DT) * 0.2
    return w


def rms_norm(x, w, eps):
    # LlamaRMSNorm / Qwen2RMSNorm: variance in the compute dtype, then weight * normalised.
    variance = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + eps))


def rope_inv_freq(c, hd):
    """transformers' _compute_default_rope_parameters / _compute_llama3_parameters, in fp32."""
    base = c["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = c.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_freq_llama)
    return inv_freq


def rope_cos_sin(c, hd, T):
    inv_freq = rope_inv_freq(c, hd)
    pos = torch.arange(T, dtype=torch.int64).float()
    freqs = (inv_freq[:, None].float() @ pos[None, :]).t()  # [T, hd/2], fp32 as transformers
    emb = torch.cat((freqs, freqs), dim=-1)
    # transformers takes cos and sin in fp32 (emb.cos()); torch's vectorised fp32 cos is within one ulp of
    # the correctly rounded value, not always equal to it. Rounded from float64 here (as comigs does), so
    # that the double comparison can be tight; the two differ by at most one fp32 ulp.
    return emb.to(DT).cos().float().to(DT), emb.to(DT).sin().float().to(DT)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def llama_forward(c, w, tokens, adapters=None, lora_s=0.0, mix=None, lb_weight=0.0):
    B, T = tokens.shape
    d, H, KV = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // H
    eps = c["rms_norm_eps"]
    cos, sin = rope_cos_sin(c, hd, T)
    x = w["model.embed_tokens.weight"][tokens]
    aux = torch.zeros((), dtype=DT)

    def proj(p, name, inp):
        y = inp @ w[p + name + ".weight"].t()
        if p + name + ".bias" in w:
            y = y + w[p + name + ".bias"]
        if adapters:
            y = y + lora(inp, adapters[p + name + ".lora_A"], adapters[p + name + ".lora_B"], lora_s)
        return y

    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = proj(p, "self_attn.q_proj", a).view(B, T, H, hd).transpose(1, 2)
        k = proj(p, "self_attn.k_proj", a).view(B, T, KV, hd).transpose(1, 2)
        v = proj(p, "self_attn.v_proj", a).view(B, T, KV, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        n_rep = H // KV
        k = k[:, :, None].expand(B, KV, n_rep, T, hd).reshape(B, H, T, hd)  # repeat_kv
        v = v[:, :, None].expand(B, KV, n_rep, T, hd).reshape(B, H, T, hd)
        o = causal_softmax_attention(q, k, v).transpose(1, 2).reshape(B, T, H * hd)
        x = x + proj(p, "self_attn.o_proj", o)
        m = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        if mix is None:
            y = (F.silu(m @ w[p + "mlp.gate_proj.weight"].t()) * (m @ w[p + "mlp.up_proj.weight"].t()))
            y = y @ w[p + "mlp.down_proj.weight"].t()
        else:
            base = {"gate.weight": w[p + "mlp.gate_proj.weight"], "up.weight": w[p + "mlp.up_proj.weight"],
                    "down.weight": w[p + "mlp.down_proj.weight"]}
            flat = m.reshape(B * T, d)
            check_margins(flat, adapters[p + "mlp.router.weight"], mix.top_k, p)
            y, lb = mixture(flat, base, adapters, p + "mlp.", mix)
            y = y.view(B, T, d)
            aux = aux + lb_weight * lb.sum()
        x = x + y
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return (x @ head.t()).reshape(B * T, -1), aux


# ----------------------------------------------------------------------------------------------------
# Adapters


def adapter_tensors(kind, c, gen, lora_rank, mix):
    """Attention LoRA and mixture tensors under comigs' names, all nonzero."""
    t = {}
    if kind == "gpt2":
        d, L, h = c["n_embd"], c["n_layer"], 4 * c["n_embd"]
        projs = [(f"h.{i}.attn.c_attn.", d, 3 * d) for i in range(L)] + [(f"h.{i}.attn.c_proj.", d, d) for i in range(L)]
        mlps = [(f"h.{i}.mlp.", d, h) for i in range(L)]
        linears = [("fc", d, h), ("proj", h, d)]
    else:
        d, L, h = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
        H, KV = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or d // H
        projs = []
        for i in range(L):
            p = f"model.layers.{i}.self_attn."
            projs += [(p + "q_proj.", d, H * hd), (p + "k_proj.", d, KV * hd), (p + "v_proj.", d, KV * hd),
                      (p + "o_proj.", H * hd, d)]
        mlps = [(f"model.layers.{i}.mlp.", d, h) for i in range(L)]
        linears = [("gate", d, h), ("up", d, h), ("down", h, d)]
    for prefix, i_, o_ in projs:
        t[prefix + "lora_A"] = torch.randn(lora_rank, i_, generator=gen, dtype=DT) / math.sqrt(i_)
        t[prefix + "lora_B"] = torch.randn(o_, lora_rank, generator=gen, dtype=DT) * 0.1
    for prefix, d_, _ in mlps:
        t[prefix + "router.weight"] = torch.randn(mix.experts, d_, generator=gen, dtype=DT) * 0.5
        for e in range(mix.experts):
            for name, i_, o_ in linears:
                t[f"{prefix}experts.{e}.{name}.lora_A"] = torch.randn(mix.rank, i_, generator=gen, dtype=DT) / math.sqrt(i_)
                t[f"{prefix}experts.{e}.{name}.lora_B"] = torch.randn(o_, mix.rank, generator=gen, dtype=DT) * 0.1
    return t


# ----------------------------------------------------------------------------------------------------
# GGUF (llama.cpp's layout, written here from its converter's documented behaviour, not from comigs)


def gguf_matrix_type(name, tag):
    """The ggml type of a matrix in a quantized case: Q4_0 cases keep the untied head in Q8_0 (mixed types)."""
    if tag == "Q4_0" and name == "lm_head.weight":
        return "Q8_0"
    return tag


def quant_round(t, qtype):
    """A matrix's values after quantizing each row to qtype and dequantizing, in float64."""
    a = t.to(torch.float32).numpy()
    q, dq = (qr.quantize_q8_0, qr.dequantize_q8_0) if qtype == "Q8_0" else (qr.quantize_q4_0, qr.dequantize_q4_0)
    rows = [dq(q(r), r.size) for r in a]
    return torch.tensor(np.stack(rows), dtype=DT)


def permute_qk(w, heads):
    """llama.cpp's converter (LlamaModel.permute): rows reordered for GGML's pairwise RoPE."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bytes_to_unicode():
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


BPE_CORPUS = ("the quick brown fox jumps over the lazy dog; the dog sleeps. there then these those other "
              "mother brother weather whether 2024 1234 tokens token ization the theory of the three trees")


def tiny_bpe(vocab_size, n_special, specials_first):
    """A byte-level BPE vocabulary: 256 byte tokens (GPT-2's order), merges learned greedily on BPE_CORPUS
    (words with their leading space), and n_special added tokens first or last. Returns (tokens, merges,
    special ids)."""
    b2u = bytes_to_unicode()
    byte_tokens = [b2u[b] for b in sorted(b2u, key=lambda b: list(b2u).index(b))]
    n_merges = vocab_size - 256 - n_special
    words = [[b2u[b] for b in (w if i == 0 else " " + w).encode()] for i, w in enumerate(BPE_CORPUS.split(" "))]
    merges, vocab = [], list(byte_tokens)
    while len(merges) < n_merges:
        counts = {}
        for wd in words:
            for a, b in zip(wd, wd[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        vocab.append(a + b)
        for wd in words:
            i = 0
            while i + 1 < len(wd):
                if wd[i] == a and wd[i + 1] == b:
                    wd[i:i + 2] = [a + b]
                i += 1
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"][:n_special]
    tokens = specials + vocab if specials_first else vocab + specials
    first = 0 if specials_first else len(vocab)
    return tokens, merges, list(range(first, first + n_special))


def write_tokenizer(case_dir, name, c):
    """GGUF tokenizer metadata, and the same tokenizer as a tokenizer.json (transformers' format)."""
    smol = name.startswith("smollm")
    tokens, merges, special_ids = tiny_bpe(c["vocab_size"], 4, specials_first=smol)
    # The last added token is an ordinary one (transformers special false; llama.cpp USER_DEFINED).
    kinds = {i: (4 if i == special_ids[-1] else 3) for i in special_ids}
    digits = {"type": "Digits", "individual_digits": True}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    llama3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
              "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    pre = ({"type": "Sequence", "pretokenizers": [digits, byte_level]} if smol else
           {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated",
                                                   "invert": False},
                                                  dict(byte_level, use_regex=False)]})
    tj = {"version": "1.0", "normalizer": None, "pre_tokenizer": pre, "decoder": {"type": "ByteLevel"},
          "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": kinds[i] == 3} for i in special_ids],
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                    "ignore_merges": not smol,
                    "vocab": {t: i for i, t in enumerate(tokens) if i not in kinds},
                    "merges": [a + " " + b for a, b in merges]}}
    with open(os.path.join(case_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    meta = [("tokenizer.ggml.model", gg.T_STR, "gpt2"),
            ("tokenizer.ggml.pre", gg.T_STR, "smollm" if smol else "llama-bpe"),
            ("tokenizer.ggml.tokens", gg.T_ARR, (gg.T_STR, tokens)),
            ("tokenizer.ggml.token_type", gg.T_ARR, (gg.T_I32, [kinds.get(i, 1) for i in range(len(tokens))])),
            ("tokenizer.ggml.merges", gg.T_ARR, (gg.T_STR, [a + " " + b for a, b in merges])),
            ("tokenizer.ggml.bos_token_id", gg.T_U32, c["bos_token_id"]),
            ("tokenizer.ggml.eos_token_id", gg.T_U32, c["eos_token_id"])]
    return meta


def write_gguf_model(case_dir, name, c, w, tag):
    """model.gguf as llama.cpp's convert_hf_to_gguf.py lays a LlamaForCausalLM / Qwen2ForCausalLM out."""
    arch = c["model_type"]
    d, H, KV = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // H
    meta = [("general.architecture", gg.T_STR, arch), ("general.type", gg.T_STR, "model"),
            ("general.name", gg.T_STR, name),
            (arch + ".block_count", gg.T_U32, c["num_hidden_layers"]),
            (arch + ".context_length", gg.T_U32, c["max_position_embeddings"]),
            (arch + ".embedding_length", gg.T_U32, d),
            (arch + ".feed_forward_length", gg.T_U32, c["intermediate_size"]),
            (arch + ".attention.head_count", gg.T_U32, H),
            (arch + ".attention.head_count_kv", gg.T_U32, KV),
            (arch + ".rope.freq_base", gg.T_F32, c["rope_theta"]),
            (arch + ".attention.layer_norm_rms_epsilon", gg.T_F32, c["rms_norm_eps"]),
            (arch + ".vocab_size", gg.T_U32, c["vocab_size"]),
            (arch + ".rope.dimension_count", gg.T_U32, hd)]
    if c.get("head_dim"):
        meta += [(arch + ".attention.key_length", gg.T_U32, hd), (arch + ".attention.value_length", gg.T_U32, hd)]
    if tag in ("Q8_0", "Q4_0"):
        meta += write_tokenizer(case_dir, name, c)
    ggml = {"F32": gg.GGML_F32, "F16": gg.GGML_F16, "BF16": gg.GGML_BF16, "Q8_0": gg.GGML_Q8_0, "Q4_0": gg.GGML_Q4_0}
    tensors = []

    def add(gguf_name, hf_name, permute_heads=None):
        t = w[hf_name]
        if permute_heads:
            t = permute_qk(t, permute_heads)
        kind = gg.GGML_F32 if t.dim() == 1 else ggml[gguf_matrix_type(hf_name, tag)]
        tensors.append((gguf_name, kind, t.to(torch.float32).numpy()))

    add("token_embd.weight", "model.embed_tokens.weight")
    scaling = c.get("rope_scaling")
    if scaling and scaling.get("rope_type") == "llama3":
        # LlamaModel.generate_extra_tensors: per-frequency divisors of the inverse frequencies.
        base = c["rope_theta"]
        freqs = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        factors = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                factors.append(1.0)
            elif wavelen > old / lo:
                factors.append(factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        tensors.append(("rope_freqs.weight", gg.GGML_F32, np.array(factors, dtype=np.float32)))
    permute = arch == "llama"
    for i in range(c["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight")
        for g, h, heads in (("attn_q", "q_proj", H), ("attn_k", "k_proj", KV), ("attn_v", "v_proj", None),
                            ("attn_output", "o_proj", None)):
            add(b + g + ".weight", p + "self_attn." + h + ".weight", heads if permute else None)
            if p + "self_attn." + h + ".bias" in w:
                add(b + g + ".bias", p + "self_attn." + h + ".bias", heads if permute else None)
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        for g, h in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            add(b + g + ".weight", p + "mlp." + h + ".weight")
    add("output_norm.weight", "model.norm.weight")
    if not c["tie_word_embeddings"]:
        add("output.weight", "lm_head.weight")
    with open(os.path.join(case_dir, "model.gguf"), "wb") as f:
        f.write(gg.write_gguf(meta, tensors))


# ----------------------------------------------------------------------------------------------------
# Cases


GPT2_BASE = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "layer_norm_epsilon": 1e-05,
             "model_type": "gpt2", "n_embd": 16, "n_head": 4, "n_inner": None, "n_layer": 2, "n_positions": 12,
             "vocab_size": 37, "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": True}
LLAMA_BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 16,
              "intermediate_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6,
              "num_hidden_layers": 2, "vocab_size": 41, "rms_norm_eps": 1e-05, "rope_theta": 500.0,
              "max_position_embeddings": 64, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": [2, 3],
              "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                               "original_max_position_embeddings": 64}}
QWEN2_BASE = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 16,
              "intermediate_size": 20, "num_attention_heads": 4, "num_key_value_heads": 1, "num_hidden_layers": 2,
              "vocab_size": 43, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 128,
              "tie_word_embeddings": True, "use_sliding_window": False, "rope_scaling": None, "eos_token_id": 5}

CASES = [
    # name, kind, config changes, file dtype, shards, hub-style keys (GPT-2), experts, top_k, seed
    ("gpt2_f32", "gpt2", {}, "F32", 1, True, 2, 1, 11),
    ("gpt2_bf16", "gpt2", {"n_layer": 3}, "BF16", 1, False, 2, 2, 12),
    ("llama_f32_gqa_llama3_untied", "llama", {}, "F32", 1, False, 3, 2, 13),
    ("llama_bf16_tied_sharded", "llama", {"tie_word_embeddings": True, "head_dim": None, "num_key_value_heads": 4,
                                          "rope_scaling": None, "rope_theta": 10000.0}, "BF16", 2, False, 2, 1, 14),
    ("qwen2_f32_tied", "qwen2", {}, "F32", 1, False, 3, 2, 15),
    ("qwen2_bf16_untied", "qwen2", {"tie_word_embeddings": False, "num_key_value_heads": 2}, "BF16", 1, False, 2, 2, 16),
    # F16 files (older Llama-family releases, fp16 exports): widened to fp32 at load.
    ("gpt2_f16", "gpt2", {}, "F16", 1, False, 2, 2, 17),
    ("llama_f16_gqa", "llama", {"rope_scaling": None}, "F16", 1, False, 2, 2, 18),
    # GGUF only (quantized): row lengths multiples of 32, a byte-level BPE vocabulary of 300 tokens.
    ("smollm_q8_0_gguf", "llama", {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "head_dim": None, "vocab_size": 300, "rope_scaling": None,
                                   "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1,
                                   "eos_token_id": 2}, "Q8_0", 1, False, 2, 2, 17),
    ("llama_q4_0_gguf", "llama", {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "head_dim": None, "vocab_size": 300,
                                  "tie_word_embeddings": False, "rope_theta": 500000.0, "bos_token_id": 296,
                                  "eos_token_id": 297}, "Q4_0", 1, False, 3, 2, 18),
]
B, T = 2, 7
LORA_RANK, LORA_ALPHA = 2, 4.0
MIX_RANK, MIX_ALPHA = 2, 4.0


def make_case(name, kind, changes, tag, shards, hub_keys, experts, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    base = {"gpt2": GPT2_BASE, "llama": LLAMA_BASE, "qwen2": QWEN2_BASE}[kind]
    c = json.loads(json.dumps(base))
    c.update(changes)
    c["torch_dtype"] = {"BF16": "bfloat16", "F16": "float16"}.get(tag, "float32")
    if kind == "gpt2":
        w = gpt2_weights(c, gen)
        V, L, fwd = c["vocab_size"], c["n_layer"], gpt2_forward
    else:
        w = llama_weights(c, gen)
        V, L, fwd = c["vocab_size"], c["num_hidden_layers"], llama_forward
    if tag == "BF16":
        w = {k: bf16_round(v) for k, v in w.items()}
    elif tag == "F16":
        w = {k: f16_round(v) for k, v in w.items()}
    elif tag in ("Q8_0", "Q4_0"):
        w = {k: quant_round(v, gguf_matrix_type(k, tag)) if v.dim() == 2 else v.to(torch.float32).to(DT)
             for k, v in w.items()}
    else:
        w = {k: v.to(torch.float32).to(DT) for k, v in w.items()}
    file_weights = dict(w)
    if kind == "gpt2" and hub_keys:
        # The hub's gpt2 file: no "transformer." prefix, the attention mask buffers stored.
        for i in range(c["n_layer"]):
            n_ctx = c["n_positions"]
            file_weights[f"h.{i}.attn.bias"] = torch.ones(n_ctx, n_ctx, dtype=DT).tril().view(1, 1, n_ctx, n_ctx)
    elif kind == "gpt2":
        file_weights = {"transformer." + k: v for k, v in file_weights.items()}

    case_dir = os.path.join(OUT, name)
    shutil.rmtree(case_dir, ignore_errors=True)
    if tag not in ("Q8_0", "Q4_0"):
        write_model(os.path.join(case_dir, "model"), file_weights, tag, c, shards)
    if kind != "gpt2":
        os.makedirs(case_dir, exist_ok=True)
        write_gguf_model(case_dir, name, c, w, tag)

    mix = rm.MixtureConfig(form="gelu" if kind == "gpt2" else "swiglu", experts=experts, top_k=top_k, rank=MIX_RANK,
                           alpha=MIX_ALPHA, scaling="sqrt", expert0_importance=1.0 / experts,
                           routing="topk")
    adapters = adapter_tensors(kind, c, gen, LORA_RANK, mix)
    adapters = {k: v.to(torch.float32).to(DT) for k, v in adapters.items()}  # what the F32 inputs file holds
    tokens = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    lb_weight = 0.01 / L
    lora_s = LORA_ALPHA / math.sqrt(LORA_RANK)

    with torch.no_grad():
        base_logits, _ = fwd(c, w, tokens)
    leaves = {k: v.clone().requires_grad_(True) for k, v in adapters.items()}
    logits, aux = fwd(c, w, tokens, leaves, lora_s, mix, lb_weight)
    ce = F.cross_entropy(logits, targets.reshape(-1))
    grads = torch.autograd.grad(ce + aux, [leaves[k] for k in sorted(leaves)])

    inputs = {"tokens": (tokens, "I64"), "targets": (targets, "I64")}
    inputs.update({k: (v, "F32") for k, v in adapters.items()})
    meta = {"lora_rank": str(LORA_RANK), "lora_alpha": str(LORA_ALPHA), "lora_scaling": "sqrt",
            "experts": str(experts), "top_k": str(top_k), "mix_rank": str(MIX_RANK), "mix_alpha": str(MIX_ALPHA),
            "mix_scaling": "sqrt", "lb_weight": repr(lb_weight), "file_dtype": tag}
    write_safetensors(os.path.join(case_dir, "inputs.safetensors"), inputs, meta)
    expected = {"base.logits": (base_logits, "F64"), "logits": (logits.detach(), "F64"),
                "ce": (ce.detach().reshape(()), "F64"), "aux": (aux.detach().reshape(()), "F64")}
    for k, g in zip(sorted(leaves), grads):
        expected[k + ".grad"] = (g, "F64")
    write_safetensors(os.path.join(case_dir, "expected.safetensors"), expected, meta)
    print(f"{name}: ce {ce.item():.6f} aux {aux.item():.6f} |logits| {logits.abs().max().item():.3f}")


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    for case in CASES:
        make_case(*case)
    with open(os.path.join(OUT, "cases.txt"), "w") as f:
        for case in CASES:
            if case[3] not in ("Q8_0", "Q4_0"):
                f.write(case[0] + "\n")
    with open(os.path.join(OUT, "gguf_cases.txt"), "w") as f:
        for case in CASES:
            if case[1] != "gpt2":
                f.write(case[0] + "\n")


if __name__ == "__main__":
    main()
