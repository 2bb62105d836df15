#!/usr/bin/env python3
"""Writes the seed corpora of the tokenizer fuzzers: small byte-level tokenizer.json files (every byte,
a few merges, each pre-tokenizer form comigs reads, added tokens) into corpus_tokenizer_json/, and texts
into corpus_bpe_roundtrip/ (first byte: tokenizer and special-token choice, as fuzz_bpe_roundtrip reads
it). Run from anywhere: python3 tests/fuzz/make_tokenizer_corpus.py"""
import json
import os

here = os.path.dirname(os.path.abspath(__file__))


def byte_chars():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def spell(s):
    m = byte_chars()
    return "".join(m[b] for b in s.encode("utf-8"))


def tokenizer(pre, merges=("a b", "ab c", "Ġ t", "Ġt h", "Ġth e"), added=(), ignore_merges=False):
    vocab = {spell(chr(b)) if b < 128 else byte_chars()[b]: b for b in range(256)}
    for m in merges:
        left, right = m.split(" ")
        vocab.setdefault(left + right, len(vocab))
    return {"version": "1.0", "added_tokens": list(added), "normalizer": None, "pre_tokenizer": pre,
            "post_processor": None, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "ignore_merges": ignore_merges,
                      "vocab": vocab, "merges": list(merges)}}


byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
llama3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
          "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
split = {"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated", "invert": False}
seeds = {
    "gpt2_like": tokenizer(byte_level),
    "llama3_like": tokenizer({"type": "Sequence", "pretokenizers": [split, dict(byte_level, use_regex=False)]},
                             added=[{"id": 300, "content": "<|eot|>", "special": True},
                                    {"id": 301, "content": "<x>", "special": False}], ignore_merges=True),
    "digits": tokenizer({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}),
    "pair_merges": dict(tokenizer(byte_level), model=dict(tokenizer(byte_level)["model"],
                                                          merges=[["a", "b"], ["ab", "c"]])),
}
out = os.path.join(here, "corpus_tokenizer_json")
os.makedirs(out, exist_ok=True)
for name, j in seeds.items():
    with open(os.path.join(out, name + ".json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))

texts = [b"\x00Hello world, it's 2024!", b"\x01 I'M here\r\n\r\n  ok  ", b"\x82<|eot_id|>x<|endoftext|>",
         "\x02中文 ελληνικά 😀 ١٢٣ 'ſ".encode("utf-8"), b"\x00\xff\xfe\xc3(\xe2\x82", b"\x01" + b" " * 100 + b"x"]
out = os.path.join(here, "corpus_bpe_roundtrip")
os.makedirs(out, exist_ok=True)
for i, t in enumerate(texts):
    with open(os.path.join(out, f"seed{i}"), "wb") as f:
        f.write(t)
