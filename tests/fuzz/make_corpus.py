#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_safetensors into corpus/: a few tiny valid files (as comigs and as the
Python writers lay them out) and a few invalid ones, each a small step away from a valid file so the
fuzzer starts near the interesting checks. Re-run after changing it; the files are committed."""
import os
import struct

M = (1 << 64) - 1
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)


def rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M


def rnd(acc, lane):
    return (rotl((acc + lane * P2) & M, 31) * P1) & M


def xxh64(data, seed=0):
    """XXH64, so that corpus files can carry a valid comigs.checksum."""
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + P1 + P2) & M, (seed + P2) & M, seed, (seed - P1) & M]
        while i + 32 <= n:
            for k in range(4):
                v[k] = rnd(v[k], struct.unpack_from("<Q", data, i + 8 * k)[0])
            i += 32
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & M
        for x in v:
            h = ((h ^ rnd(0, x)) * P1 + P4) & M
    else:
        h = (seed + P5) & M
    h = (h + n) & M
    while i + 8 <= n:
        h ^= rnd(0, struct.unpack_from("<Q", data, i)[0])
        h = (rotl(h, 27) * P1 + P4) & M
        i += 8
    if i + 4 <= n:
        h ^= (struct.unpack_from("<I", data, i)[0] * P1) & M
        h = (rotl(h, 23) * P2 + P3) & M
        i += 4
    while i < n:
        h ^= (data[i] * P5) & M
        h = (rotl(h, 11) * P1) & M
        i += 1
    h ^= h >> 33
    h = (h * P2) & M
    h ^= h >> 29
    h = (h * P3) & M
    h ^= h >> 32
    return h


def file_bytes(header, data=b"", pad=True):
    h = header.encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def comigs_file(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, data bytes), laid out in order, with a checksum."""
    data = b"".join(t[3] for t in tensors)
    meta = dict(metadata or {})
    meta["comigs.checksum"] = "xxh64:%016x" % xxh64(data)
    parts = ['"__metadata__":{' + ",".join('"%s":"%s"' % kv for kv in sorted(meta.items())) + "}"]
    off = 0
    for name, dtype, shape, raw in tensors:
        parts.append('"%s":{"dtype":"%s","shape":[%s],"data_offsets":[%d,%d]}'
                     % (name, dtype, ",".join(map(str, shape)), off, off + len(raw)))
        off += len(raw)
    return file_bytes("{" + ",".join(parts) + "}", data)


def main():
    assert xxh64(b"") == 0xEF46DB3751D8E999 and xxh64(b"abc") == 0x44BC2CF5AD770999
    f32 = struct.pack("<3f", 1.0, -2.5, 0.125)
    bf16 = struct.pack("<2H", 0x3F80, 0xC040)
    seeds = {
        "valid_comigs_f32_bf16": comigs_file(
            [("w", "F32", [1, 3], f32), ("b", "BF16", [2], bf16)], {"format": "pt"}),
        "valid_comigs_scalar_empty_int": comigs_file(
            [("s", "F64", [], struct.pack("<d", 3.5)), ("e", "F16", [0], b""),
             ("i", "I32", [2], struct.pack("<2i", 7, -7)), ("h", "F16", [1], struct.pack("<H", 0x3C00))]),
        "valid_python_style": file_bytes(
            '{"__metadata__":{"format":"pt"},'
            '"lora_B.weight":{"dtype":"BF16","shape":[2,1],"data_offsets":[12,16]},'
            '"lora_A.weight":{"dtype":"F32","shape":[1,3],"data_offsets":[0,12]}}', f32 + bf16),
        "valid_empty": file_bytes("{}"),
        "valid_all_dtypes": file_bytes(
            "{" + ",".join('"%s":{"dtype":"%s","shape":[1],"data_offsets":[%d,%d]}' % (d, d, o, o + s)
                           for d, s, o in [("F8_E4M3", 1, 0), ("F8_E5M2", 1, 1), ("BOOL", 1, 2), ("U8", 1, 3),
                                           ("I8", 1, 4), ("U16", 2, 5), ("I16", 2, 7), ("U32", 4, 9),
                                           ("U64", 8, 13), ("I64", 8, 21)]) + "}", bytes(range(29))),
        "invalid_gap": file_bytes('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)),
        "invalid_overflow": file_bytes(
            '{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}'),
        # Found by fuzzing: a partial product that fits in 64 unsigned bits but not in a signed size.
        "invalid_overflow_signed": file_bytes(
            '{"a":{"dtype":"F32","shape":[4294967296,4294067296,0],"data_offsets":[0,0]}}'),
        "invalid_duplicate": file_bytes(
            '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            b"x"),
        "invalid_checksum": comigs_file([("w", "F32", [3], f32)])[:-1] + b"\x00",
        "invalid_truncated": file_bytes('{"a":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}}', bytes(9)),
        "invalid_metadata": file_bytes('{"__metadata__":{"k":1}}'),
        "invalid_header_length": struct.pack("<Q", 1 << 40) + b"{}",
    }
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    os.makedirs(out, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(out, name + ".safetensors"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
