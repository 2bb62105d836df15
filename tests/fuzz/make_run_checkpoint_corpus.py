#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_run_checkpoint into corpus_run_checkpoint/: the first byte of each
input picks what the target parses (0 a generation manifest, 1 a user's checkpoint file with its pending
aggregate, 2 a demo method's results), the rest is a small valid example of it, or one a step away.
Re-run after changing it; the files are committed."""
import json
import os
import struct

from make_corpus import xxh64

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus_run_checkpoint")


def manifest(round_, files, checksum_ok=True):
    body = {"format": "comigs-run-checkpoint", "version": 1, "round": round_,
            "settings": [["seed", "3"], ["runner.rounds", "5"]],
            "files": [{"name": n, "bytes": b, "xxh64": "%016x" % h} for n, b, h in files]}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    doc = dict(body)
    doc["checksum"] = "%016x" % (xxh64(text.encode()) ^ (0 if checksum_ok else 1))
    return json.dumps(doc, sort_keys=True, indent=1).encode()


def safetensors(tensors, metadata):
    """tensors: list of (name, dtype, shape, raw bytes), laid out in this order."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(*v):
    return struct.pack("<%df" % len(v), *v)


def user_file(pending_rank=2):
    r = pending_rank
    t = [("param/h.0.mlp.experts.0.fc.lora_A", "F32", [2, 4], f32(*[0.1 * i for i in range(8)])),
         ("optim/expert_optimizer.h.0.mlp.experts.0.fc.lora_A.exp_avg", "F32", [2, 4], f32(*[0.0] * 8)),
         ("count/trainer.expert_steps", "I64", [], struct.pack("<q", 12)),
         ("count/trainer.router_steps", "I64", [], struct.pack("<q", 4)),
         ("rng/train", "U64", [4], struct.pack("<4Q", 1, 2, 3, 4)),
         ("rng/validation", "U64", [4], struct.pack("<4Q", 5, 6, 7, 8)),
         ("round", "I64", [], struct.pack("<q", 3)),
         ("pending/h.0.mlp.experts.0.fc.lora_A", "F32", [r, 4], f32(*[0.5] * (4 * r))),
         ("pending/h.0.mlp.experts.0.fc.lora_B", "F32", [6, r], f32(*[0.25] * (6 * r))),
         ("pending/meta/h.0.mlp.experts.0.fc.lora_A", "F64", [4], struct.pack("<4d", 16.0, 16.0 / r ** 0.5, 1, 0)),
         ("pending/meta/h.0.mlp.experts.0.fc.lora_B", "F64", [4], struct.pack("<4d", 16.0, 16.0 / r ** 0.5, 1, 0))]
    meta = {"comigs.format": "checkpoint", "comigs.checkpoint_version": "1", "comigs.dtype": "F32",
            "comigs.run.user": "1", "comigs.run.pending": "1"}
    return safetensors(t, meta)


def results(n_users=2):
    def opt(v):
        return struct.pack("<Bd", 0, 0.0) if v is None else struct.pack("<Bd", 1, v)

    def s(text):
        return struct.pack("<Q", len(text)) + text.encode()

    b = s("comigs-1g1s") + struct.pack("<Q", n_users)
    for u in range(n_users):
        b += struct.pack("<i", u) + struct.pack("<3d", 20.5, 20.25, 22.0) + opt(2.5) + opt(0.1)
        b += struct.pack("<d", 0.6) + opt(0.7) + opt(None) + struct.pack("<d", 28.0)
    b += struct.pack("<q", 5120)  # upload_floats_per_round
    b += struct.pack("<Q", 2) + struct.pack("<qd", 4, 25.0) + struct.pack("<qd", 8, 24.0)  # curve
    b += struct.pack("<d", 1.5)  # seconds
    # one routing sample: user, text, expert[layer][token], personal, expert_is_generalist
    b += struct.pack("<Q", 1) + struct.pack("<i", 0) + struct.pack("<Q", 3) + b"abc"
    b += struct.pack("<Q", 1) + struct.pack("<Q", 3) + struct.pack("<3i", 0, 1, 0)
    b += struct.pack("<Q", 3) + b"\x00\x01\x00" + struct.pack("<Q", 2) + b"\x01\x00"
    return b


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {
        "manifest_valid": b"\x00" + manifest(3, [("server.safetensors", 120, 0x1234), ("user-1.safetensors", 800, 7)]),
        "manifest_bad_checksum": b"\x00" + manifest(3, [("user-1.safetensors", 800, 7)], checksum_ok=False),
        "manifest_other_round": b"\x00" + manifest(4, [("user-1.safetensors", 800, 7)]),
        "user_file_valid": b"\x01" + user_file(),
        "user_file_rank_mismatch": b"\x01" + user_file().replace(b'"shape":[6,2]', b'"shape":[6,3]'),
        "results_valid": b"\x02" + results(),
        "results_truncated": b"\x02" + results()[:-7],
    }
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
