#!/usr/bin/python3
"""GGML's Q8_0 and Q4_0 block functions in numpy, independent of comigs, and the golden file of the
quantization tests (tests/golden/quant_blocks.safetensors).

    /usr/bin/python3 tools/quant_reference.py            # writes tests/golden/quant_blocks.safetensors
    /usr/bin/python3 tools/quant_reference.py --out DIR  # writes elsewhere (e.g. to diff)

The functions follow ggml's reference C code (quantize_row_q8_0_ref, quantize_row_q4_0_ref and the
dequantize_row_* functions) operation by operation in float32:
  Q8_0: amax = max|x|, d = amax / 127, id = 1/d (0 when d = 0), d stored as IEEE fp16 (round to nearest
        even), q = roundf(x * id) (half away from zero); value q * fp16(d).
  Q4_0: max = the value of largest |x| (sign kept, the first on ties), d = max / -8, id as above,
        q = min(15, (int8)(x * id + 8.5)) (the product rounded to float before the add, truncation toward
        zero), byte j = q_j | q_{j+16} << 4; value (q - 8) * fp16(d).
The file holds the input rows `x` [R, 256] (F32), and for each format the raw blocks `<fmt>.blocks`
[R, bytes per row] (U8) and the dequantized values `<fmt>.values` [R, 256] (F32); `q4_0_q8_0.dot` [R, R]
(F64) is ggml's Q4_0 x Q8_0 block dot product (the int8 decode products) of row i's Q4_0 blocks against
row j quantized to Q8_0. The rows include the
cases the rounding rules decide: halves, values a float ulp either side of them, opposite signs of equal
magnitude, zero blocks, tiny and large scales, fp16 subnormal scales.
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import safetensors_io as sio  # noqa: E402

QK = 32
F = np.float32


def round_half_away(v):
    """roundf of float32 values (half away from zero); float64 makes |v| + 0.5 exact."""
    a = np.abs(v.astype(np.float64))
    return (np.sign(v) * np.floor(a + 0.5)).astype(np.float64)


def quantize_q8_0(x):
    x = np.asarray(x, dtype=F).reshape(-1, QK)
    out = bytearray()
    for blk in x:
        amax = F(np.max(np.abs(blk)))
        d = F(amax / F(127))
        idv = F(F(1) / d) if d != 0 else F(0)
        q = round_half_away((blk * idv).astype(F)).astype(np.int8)
        out += np.array([d], dtype=F).astype(np.float16).tobytes()
        out += q.tobytes()
    return bytes(out)


def quantize_q4_0(x):
    x = np.asarray(x, dtype=F).reshape(-1, QK)
    out = bytearray()
    for blk in x:
        amax, mx = F(0), F(0)
        for v in blk:  # the first value of largest magnitude (strict comparison, as in ggml)
            if amax < abs(v):
                amax, mx = F(abs(v)), F(v)
        d = F(mx / F(-8))
        idv = F(F(1) / d) if d != 0 else F(0)
        prod = (blk * idv).astype(F)                   # rounded to float
        shifted = (prod + F(8.5)).astype(F)            # then the add, rounded to float
        q = np.minimum(15, np.trunc(shifted).astype(np.int64)).astype(np.uint8)
        packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
        out += np.array([d], dtype=F).astype(np.float16).tobytes()
        out += packed.tobytes()
    return bytes(out)


def dequantize_q8_0(blocks, n):
    b = np.frombuffer(blocks, dtype=np.uint8).reshape(-1, 34)
    d = b[:, :2].copy().view(np.float16).astype(F)        # [nb, 1]
    q = b[:, 2:].copy().view(np.int8).astype(F)           # [nb, 32]
    return (q * d).astype(F).reshape(n)


def dequantize_q4_0(blocks, n):
    b = np.frombuffer(blocks, dtype=np.uint8).reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(F)
    qs = b[:, 2:]
    lo = ((qs & 0x0F).astype(np.int32) - 8).astype(F)
    hi = ((qs >> 4).astype(np.int32) - 8).astype(F)
    return (np.concatenate([lo, hi], axis=1) * d).astype(F).reshape(n)


def vec_dot_q4_0_q8_0(wblocks, xblocks):
    """ggml's Q4_0 x Q8_0 dot product (the int8 products of a decode row): per block the integer sum of
    (nibble - 8) * q, exact, times fp16(dw) * fp16(dx); summed in float64."""
    w = np.frombuffer(wblocks, dtype=np.uint8).reshape(-1, 18)
    x = np.frombuffer(xblocks, dtype=np.uint8).reshape(-1, 34)
    dw = w[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
    dx = x[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
    qs = w[:, 2:].astype(np.int64)
    levels = np.concatenate([(qs & 0x0F) - 8, (qs >> 4) - 8], axis=1)   # [nb, 32]
    xq = x[:, 2:].copy().view(np.int8).astype(np.int64)                 # [nb, 32]
    isum = (levels * xq).sum(axis=1)
    return float(np.sum(dw * dx * isum.astype(np.float64)))


def test_rows(rng):
    """Rows of 256 values (8 blocks each) that exercise every rounding rule."""
    rows = []
    # Plain random rows at several scales (weights of real models are around 0.02).
    for scale in (0.02, 1.0, 300.0):
        rows.append(rng.standard_normal(256).astype(F) * F(scale))
    # Q8_0: values that land exactly on halves of a step and a float ulp either side: amax 127 gives
    # d = 1, id = 1, so x * id = x.
    r = np.zeros(256, dtype=F)
    for b in range(8):
        r[b * 32] = F(127)
        halves = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5], dtype=F)
        r[b * 32 + 1:b * 32 + 9] = halves
        r[b * 32 + 9:b * 32 + 17] = np.nextafter(halves, np.float32(np.inf))
        r[b * 32 + 17:b * 32 + 25] = np.nextafter(halves, np.float32(-np.inf))
        r[b * 32 + 25:b * 32 + 32] = rng.uniform(-127, 127, 7).astype(F)
    rows.append(r)
    # Q4_0: max = -8 gives d = 1, id = 1: x + 8.5 near integers; opposite signs of equal magnitude (the
    # first wins); a positive max (d negative).
    r = np.zeros(256, dtype=F)
    for b in range(8):
        blk = rng.uniform(-8, 8, 32).astype(F)
        blk[0] = F(-8) if b % 2 == 0 else F(8)
        blk[1] = -blk[0]
        base = np.array([-0.5, 0.5, 1.5, -7.5, 6.5, 7.5, -8, 7.999999], dtype=F)
        blk[2:10] = base
        blk[10:18] = np.nextafter(base, np.float32(np.inf))
        blk[18:26] = np.nextafter(base, np.float32(-np.inf))
        r[b * 32:(b + 1) * 32] = blk
    rows.append(r)
    # Zero blocks, a single nonzero value, tiny values (fp16 subnormal and zero scales), mixed scales.
    r = np.zeros(256, dtype=F)
    r[40] = F(1e-3)
    r[64:96] = rng.standard_normal(32).astype(F) * F(1e-6)        # d in fp16's subnormal range
    r[96:128] = rng.standard_normal(32).astype(F) * F(1e-9)       # d rounds to zero in fp16
    r[128:160] = rng.standard_normal(32).astype(F) * F(1e4)
    r[160:192] = F(-3.0)                                          # a constant block
    r[192:224] = np.linspace(-1, 1, 32, dtype=F)
    r[224:256] = rng.standard_normal(32).astype(F) * F(0.02)
    rows.append(r)
    # Many random blocks with random scales (the bulk of the comparison).
    for _ in range(8):
        scales = np.exp(rng.uniform(-8, 6, 8)).astype(F)
        rows.append((rng.standard_normal((8, 32)).astype(F) * scales[:, None]).reshape(256).astype(F))
    return np.stack(rows).astype(F)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "golden"))
    args = ap.parse_args()
    rng = np.random.default_rng(2509)
    x = test_rows(rng)
    tensors = {"x": x}
    for name, quant, dequant, bpb in (("q8_0", quantize_q8_0, dequantize_q8_0, 34),
                                      ("q4_0", quantize_q4_0, dequantize_q4_0, 18)):
        blocks = [quant(row) for row in x]
        vals = np.stack([dequant(b, x.shape[1]) for b in blocks])
        assert all(len(b) == x.shape[1] // QK * bpb for b in blocks)
        # Self-checks: the error bounds of the formats.
        err = np.abs(vals - x).reshape(x.shape[0], -1, QK)
        amax = np.abs(x).reshape(x.shape[0], -1, QK).max(axis=2, keepdims=True)
        # Half a step (a whole one for Q4_0's asymmetric range), the fp16 rounding of the scale times the
        # largest level, and fp16's subnormal step for tiny blocks.
        step = amax / (127 if name == "q8_0" else 8)
        bound = step * (0.5 if name == "q8_0" else 1.0) + amax * 2.0 ** -10 + 1e-5
        assert np.all(err <= bound), name
        tensors[name + ".blocks"] = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(x.shape[0], -1)
        tensors[name + ".values"] = vals
    # The int8 decode products: row i's Q4_0 blocks (weights) against row j quantized to Q8_0
    # (activations), every pair.
    q4 = [quantize_q4_0(row) for row in x]
    q8 = [quantize_q8_0(row) for row in x]
    tensors["q4_0_q8_0.dot"] = np.array([[vec_dot_q4_0_q8_0(q4[i], q8[j]) for j in range(len(x))]
                                         for i in range(len(x))], dtype=np.float64)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "quant_blocks.safetensors")
    sio.save_file(tensors, path, metadata={"source": "tools/quant_reference.py", "block": "32"})
    back, meta = sio.load_file(path)
    for k, v in tensors.items():
        assert np.array_equal(back[k], v), k
    print("wrote", os.path.normpath(path), {k: v.shape for k, v in tensors.items()})


if __name__ == "__main__":
    main()
