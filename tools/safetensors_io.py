"""Minimal pure-Python safetensors reader/writer (no dependency on the `safetensors` package).

File layout:
  * 8 bytes: little-endian u64 N, the header length;
  * N bytes: UTF-8 JSON object {name: {"dtype": ..., "shape": [...], "data_offsets": [begin, end]},
    "__metadata__": {str: str}}, padded with trailing spaces so that N is a multiple of 8;
  * the tensor data, little-endian, row-major, contiguous in offset order with no gaps.
    Offsets are relative to the first byte after the header.

Writing is deterministic: tensors are laid out sorted by name and the JSON is emitted with a fixed
key order and no optional whitespace, so equal inputs give equal bytes.
"""

import json
import struct

import numpy as np

# safetensors dtype tag -> little-endian numpy dtype
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _tag_of(arr):
    """Return (tag, little-endian numpy dtype) for an array of any byte order."""
    dt = arr.dtype
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    for tag, npdt in _DTYPES.items():
        if npdt == dt:
            return tag, npdt
    raise TypeError(f"unsupported dtype {arr.dtype}")


def _to_numpy(value):
    # Accept numpy arrays and torch tensors (without importing torch here).
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def serialize(tensors, metadata=None):
    """Return the bytes of a safetensors file holding `tensors` (name -> array) and `metadata`."""
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("__metadata__ must map str to str")
    header = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError("'__metadata__' is not a valid tensor name")
        value = tensors[name]
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            # numpy has no bfloat16: the raw 16-bit patterns of a torch tensor (little-endian hosts).
            tag = "BF16"
            data = value.detach().cpu().contiguous().view(dtype=__import__("torch").int16).numpy().tobytes()
            arr = value
        else:
            arr = _to_numpy(value)
            tag, npdt = _tag_of(arr)
            data = np.ascontiguousarray(arr, dtype=npdt).tobytes(order="C")
        header[name] = {
            "dtype": tag,
            "shape": [int(s) for s in arr.shape],
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def save_file(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(serialize(tensors, metadata))


def deserialize(buf):
    """Parse safetensors bytes; return (tensors: dict name -> numpy array, metadata: dict)."""
    if len(buf) < 8:
        raise ValueError("file too short")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise ValueError("header length exceeds file size")
    header = json.loads(buf[8:8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(buf)[8 + n:]
    entries = sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))
    expected = 0
    tensors = {}
    for name, info in entries:
        tag = info["dtype"]
        if tag not in _DTYPES:
            raise ValueError(f"{name}: unsupported dtype {tag}")
        npdt = _DTYPES[tag]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        if begin != expected:
            raise ValueError(f"{name}: data not contiguous (begin {begin}, expected {expected})")
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * npdt.itemsize:
            raise ValueError(f"{name}: byte size {end - begin} does not match shape {shape}")
        tensors[name] = np.frombuffer(data[begin:end], dtype=npdt).reshape(shape).copy()
        expected = end
    if expected != len(data):
        raise ValueError(f"trailing bytes after tensor data ({len(data) - expected})")
    return tensors, dict(metadata)


def load_file(path):
    with open(path, "rb") as f:
        return deserialize(f.read())
