"""A Hugging Face model folder with random weights and a real model's shapes, for memory and speed
measurements where no checkpoint can be downloaded (the files are large: write them to /tmp, never
commit them).

  /usr/bin/python3 tools/make_random_model.py smollm2-135m /tmp/smollm2-135m-random [--dtype BF16] [--shards N]

Shapes (from the models' config.json): smollm2-135m, smollm2-360m, qwen2.5-0.5b, llama3.2-1b, gpt2-124m.
Weights N(0, 0.02), norm weights 1 (biases 0.02-scaled too); the config is the real one with
"comigs_random_weights": true added.
"""

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io as st  # noqa: E402

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
         "mlp_bias": False, "rope_scaling": None}
SHAPES = {
    "smollm2-135m": dict(LLAMA, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=30, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "smollm2-360m": dict(LLAMA, hidden_size=960, intermediate_size=2560, num_attention_heads=15, num_key_value_heads=5,
                         num_hidden_layers=32, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "qwen2.5-0.5b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                     "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "num_hidden_layers": 24, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True, "use_sliding_window": False,
                     "bos_token_id": 151643, "eos_token_id": 151643},
    "llama3.2-1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, num_hidden_layers=16, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
                        eos_token_id=[128001, 128008, 128009],
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "gpt2-124m": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
                  "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "n_inner": None,
                  "vocab_size": 50257, "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256},
}


def tensors(c, gen):
    """name -> shape, in the file's layout (GPT-2 Conv1D [in, out]; Llama nn.Linear [out, in])."""
    out = {}
    if c["model_type"] == "gpt2":
        d, h = c["n_embd"], 4 * c["n_embd"]
        out["wte.weight"] = (c["vocab_size"], d)
        out["wpe.weight"] = (c["n_positions"], d)
        out["ln_f.weight"] = (d,)
        out["ln_f.bias"] = (d,)
        for i in range(c["n_layer"]):
            p = f"h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[p + ln + ".weight"] = (d,)
                out[p + ln + ".bias"] = (d,)
            for name, (a, b) in {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, h),
                                 "mlp.c_proj": (h, d)}.items():
                out[p + name + ".weight"] = (a, b)
                out[p + name + ".bias"] = (b,)
        return out
    d, h, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // H
    out["model.embed_tokens.weight"] = (V, d)
    out["model.norm.weight"] = (d,)
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for name, shape in {"self_attn.q_proj": (H * hd, d), "self_attn.k_proj": (KV * hd, d),
                            "self_attn.v_proj": (KV * hd, d), "self_attn.o_proj": (d, H * hd),
                            "mlp.gate_proj": (h, d), "mlp.up_proj": (h, d), "mlp.down_proj": (d, h)}.items():
            out[p + name + ".weight"] = shape
        if c["model_type"] == "qwen2":
            for name, n in {"self_attn.q_proj": H * hd, "self_attn.k_proj": KV * hd, "self_attn.v_proj": KV * hd}.items():
                out[p + name + ".bias"] = (n,)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["BF16", "F32"], default=None, help="default: BF16 (GPT-2: F32, as shipped)")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    c = dict(SHAPES[a.shape])
    dtype = a.dtype or ("F32" if c["model_type"] == "gpt2" else "BF16")
    c["torch_dtype"] = "bfloat16" if dtype == "BF16" else "float32"
    c["comigs_random_weights"] = True
    gen = torch.Generator().manual_seed(a.seed)
    shapes = tensors(c, gen)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    tdt = torch.bfloat16 if dtype == "BF16" else torch.float32
    names = sorted(shapes)
    per = math.ceil(len(names) / a.shards)
    weight_map = {}
    total = 0
    for s in range(a.shards):
        part = names[s * per:(s + 1) * per]
        data = {}
        for n in part:
            is_norm = n.endswith("norm.weight") or ".ln_" in n and n.endswith(".weight") or n == "ln_f.weight"
            t = torch.ones(shapes[n]) if is_norm else torch.randn(shapes[n], generator=gen) * 0.02
            data[n] = t.to(tdt)
            total += t.numel() * (2 if dtype == "BF16" else 4)
        file = "model.safetensors" if a.shards == 1 else f"model-{s + 1:05d}-of-{a.shards:05d}.safetensors"
        st.save_file(data, os.path.join(a.out, file), {"format": "pt"})
        for n in part:
            weight_map[n] = file
    if a.shards > 1:
        with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    print(f"{a.out}: {a.shape}, {dtype}, {sum(math.prod(s) for s in shapes.values()) / 1e6:.1f}M parameters, "
          f"{total / 1e6:.1f} MB of weights")


if __name__ == "__main__":
    main()
