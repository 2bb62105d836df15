#!/usr/bin/python3
"""GGUF golden files for the reader tests, written by an independent pure-Python GGUF v3 writer
(numpy only), and the seed corpus of the GGUF fuzz target.

    /usr/bin/python3 tools/gguf_golden.py            # writes tests/golden/gguf_*.gguf, tests/fuzz/gguf_corpus/
    /usr/bin/python3 tools/gguf_golden.py --out DIR  # golden files elsewhere (e.g. to diff)

Files:
  gguf_types.gguf    metadata of every value type (scalars and arrays, strings with non-ASCII text), tensors
                     of every supported type: F32, F16, BF16, Q8_0, Q4_0, of 1, 2 and 3 dimensions;
  gguf_align64.gguf  the same tensors with general.alignment = 64;
  gguf_expected.safetensors  every tensor of both as float32 (F16/BF16 converted, Q8_0/Q4_0 dequantized by
                     tools/quant_reference.py), shaped [.., ne1, ne0] (PyTorch order).
Layout conventions (which comigs' writer follows too, so that the bytes compare equal): metadata and
tensor infos in insertion order, tensor offsets in order, each aligned, zero padding.
"""

import argparse
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import quant_reference as qr  # noqa: E402
import safetensors_io as sio  # noqa: E402

T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
FMT = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i", T_F32: "<f", T_BOOL: "<?",
       T_U64: "<Q", T_I64: "<q", T_F64: "<d"}
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_BF16 = 0, 1, 2, 8, 30


def enc_str(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_value(t, v):
    if t == T_STR:
        return enc_str(v)
    if t == T_ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(enc_value(et, x) for x in items)
    return struct.pack(FMT[t], v)


def bf16_bytes(a):
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return r.tobytes()


def tensor_bytes(kind, a):
    a = np.asarray(a, dtype=np.float32)
    if kind == GGML_F32:
        return a.astype("<f4").tobytes()
    if kind == GGML_F16:
        return a.astype("<f2").tobytes()
    if kind == GGML_BF16:
        return bf16_bytes(a)
    rows = a.reshape(-1, a.shape[-1])
    q = qr.quantize_q8_0 if kind == GGML_Q8_0 else qr.quantize_q4_0
    return b"".join(q(r) for r in rows)


def tensor_values(kind, a):
    a = np.asarray(a, dtype=np.float32)
    if kind == GGML_F32:
        return a
    if kind == GGML_F16:
        return a.astype(np.float16).astype(np.float32)
    if kind == GGML_BF16:
        return np.frombuffer(bf16_bytes(a), dtype=np.uint16).astype(np.uint32).__lshift__(16).view(np.float32).reshape(a.shape)
    rows = a.reshape(-1, a.shape[-1])
    q, dq = (qr.quantize_q8_0, qr.dequantize_q8_0) if kind == GGML_Q8_0 else (qr.quantize_q4_0, qr.dequantize_q4_0)
    return np.stack([dq(q(r), r.size) for r in rows]).reshape(a.shape)


def write_gguf(metadata, tensors, alignment=32):
    """metadata: list of (key, type, value); tensors: list of (name, ggml type, float array [.., ne1, ne0])."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, t, v in metadata:
        out += enc_str(key) + struct.pack("<I", t) + enc_value(t, v)
    datas, offset = [], 0
    for name, kind, a in tensors:
        dims = list(reversed(a.shape))  # ne0 first
        out += enc_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
        data = tensor_bytes(kind, a)
        datas.append(data)
        offset += len(data)
        offset = (offset + alignment - 1) // alignment * alignment
    out += b"\0" * ((-len(out)) % alignment)
    for d in datas:
        out += d + b"\0" * ((-len(d)) % alignment)
    return bytes(out)


def contents(rng, alignment):
    meta = [
        ("general.architecture", T_STR, "llama"),
        ("general.name", T_STR, "comigs golden \u00e9\u00e8 \u4e2d"),
        ("test.u8", T_U8, 200), ("test.i8", T_I8, -100), ("test.u16", T_U16, 60000), ("test.i16", T_I16, -30000),
        ("test.u32", T_U32, 4000000000), ("test.i32", T_I32, -2000000000), ("test.f32", T_F32, 0.1),
        ("test.bool", T_BOOL, True), ("test.u64", T_U64, 2**63 + 5), ("test.i64", T_I64, -(2**62)),
        ("test.f64", T_F64, -1.0e300),
        ("test.ints", T_ARR, (T_I32, [1, -2, 3])),
        ("test.strings", T_ARR, (T_STR, ["a", "", "\u0120the", "<|endoftext|>"])),
        ("test.floats", T_ARR, (T_F32, [0.5, -1.25])),
        ("test.empty", T_ARR, (T_U8, [])),
    ]
    if alignment != 32:
        meta.append(("general.alignment", T_U32, alignment))
    tensors = [
        ("f32.matrix", GGML_F32, rng.standard_normal((3, 5)).astype(np.float32)),
        ("f16.vector", GGML_F16, rng.standard_normal(7).astype(np.float32)),
        ("bf16.cube", GGML_BF16, rng.standard_normal((2, 3, 4)).astype(np.float32)),
        ("q8_0.matrix", GGML_Q8_0, (rng.standard_normal((3, 64)) * 0.1).astype(np.float32)),
        ("q4_0.matrix", GGML_Q4_0, rng.standard_normal((5, 32)).astype(np.float32)),
        ("blk.0.attn_q.weight", GGML_Q4_0, rng.standard_normal((2, 96)).astype(np.float32)),
    ]
    return meta, tensors


def tiny_llama(rng):
    """A Llama model file small enough for the fuzzer's inputs (d 32, 1 block, 2 heads, vocabulary 32,
    Q4_0 matrices, tied head), for models/gguf_model.hpp's readers."""
    d, h, v = 32, 32, 32
    meta = [("general.architecture", T_STR, "llama"), ("llama.block_count", T_U32, 1),
            ("llama.embedding_length", T_U32, d), ("llama.feed_forward_length", T_U32, h),
            ("llama.attention.head_count", T_U32, 2), ("llama.attention.head_count_kv", T_U32, 1),
            ("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-5), ("llama.rope.freq_base", T_F32, 10000.0)]
    m = lambda rows, cols: (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)  # noqa: E731
    ones = np.ones(d, dtype=np.float32)
    tensors = [("token_embd.weight", GGML_Q4_0, m(v, d)), ("blk.0.attn_norm.weight", GGML_F32, ones),
               ("blk.0.attn_q.weight", GGML_Q4_0, m(d, d)), ("blk.0.attn_k.weight", GGML_Q4_0, m(16, d)),
               ("blk.0.attn_v.weight", GGML_Q4_0, m(16, d)), ("blk.0.attn_output.weight", GGML_Q4_0, m(d, d)),
               ("blk.0.ffn_norm.weight", GGML_F32, ones), ("blk.0.ffn_gate.weight", GGML_Q4_0, m(h, d)),
               ("blk.0.ffn_up.weight", GGML_Q4_0, m(h, d)), ("blk.0.ffn_down.weight", GGML_Q4_0, m(d, h)),
               ("output_norm.weight", GGML_F32, ones)]
    return meta, tensors


def tiny_tokenizer():
    """tokenizer.ggml.* of a byte-level BPE vocabulary (256 byte tokens in GPT-2's alphabet, 3 merges, a
    control token), for models/gguf_model.hpp's tokenizer reader."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = [chr(c) for c in cs] + ["th", "the", "\u0120the", "<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]
    return [("tokenizer.ggml.model", T_STR, "gpt2"), ("tokenizer.ggml.pre", T_STR, "gpt-2"),
            ("tokenizer.ggml.tokens", T_ARR, (T_STR, tokens)), ("tokenizer.ggml.token_type", T_ARR, (T_I32, types)),
            ("tokenizer.ggml.merges", T_ARR, (T_STR, ["t h", "th e", "\u0120 the"]))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "golden"))
    ap.add_argument("--corpus", default=os.path.join(HERE, "..", "tests", "fuzz", "gguf_corpus"))
    args = ap.parse_args()
    expected = {}
    for fname, alignment in (("gguf_types.gguf", 32), ("gguf_align64.gguf", 64)):
        rng = np.random.default_rng(25)
        meta, tensors = contents(rng, alignment)
        data = write_gguf(meta, tensors, alignment)
        with open(os.path.join(args.out, fname), "wb") as f:
            f.write(data)
        for name, kind, a in tensors:
            expected[name] = tensor_values(kind, a)
        print("wrote", fname, len(data), "bytes")
    sio.save_file(expected, os.path.join(args.out, "gguf_expected.safetensors"), metadata={"source": "tools/gguf_golden.py"})
    # Seeds for the fuzz target: the golden files and small variations a step away from the checks.
    os.makedirs(args.corpus, exist_ok=True)
    rng = np.random.default_rng(26)
    meta, tensors = contents(rng, 32)
    seeds = {
        "valid_types.gguf": write_gguf(meta, tensors),
        "valid_small.gguf": write_gguf(meta[:2], tensors[3:5]),
        "valid_no_tensors.gguf": write_gguf(meta[:4], []),
        "valid_align64.gguf": write_gguf(meta[:1] + [("general.alignment", T_U32, 64)], tensors[:2], 64),
    }
    seeds["model_tiny_llama.gguf"] = write_gguf(*tiny_llama(rng))
    seeds["model_tokenizer_only.gguf"] = write_gguf(tiny_tokenizer(), [])
    for name, data in seeds.items():
        with open(os.path.join(args.corpus, name), "wb") as f:
            f.write(data)
    print("wrote", len(seeds), "seeds to", os.path.normpath(args.corpus))


if __name__ == "__main__":
    main()
