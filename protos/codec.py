"""The one codec between arrays and proto `Tensor`s: raw little-endian bytes + dtype + shape.

bfloat16 travels as its uint16 bit pattern (numpy has no bf16). Decoding checks that the byte count
matches dtype x shape, so a malformed tensor is a `CodecError`, never a crash or a silent reshape.
The numpy half (`to_numpy`) needs no MLX: nodes use it to validate requests off the MLX thread.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from flashmesh.protos import flashmesh_pb2 as pb

# wire dtype name -> (numpy dtype carrying the bytes, mx dtype)
DTYPES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    "float32": (np.dtype("<f4"), mx.float32),
    "float16": (np.dtype("<f2"), mx.float16),
    "bfloat16": (np.dtype("<u2"), mx.bfloat16),
    "int32": (np.dtype("<i4"), mx.int32),
    "uint32": (np.dtype("<u4"), mx.uint32),
    "int64": (np.dtype("<i8"), mx.int64),
    "uint8": (np.dtype("u1"), mx.uint8),
    "int8": (np.dtype("i1"), mx.int8),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MAX_DIMS = 8


class CodecError(ValueError):
    """A proto Tensor that does not describe a valid array (unknown dtype, wrong byte count)."""


def dtype_name(dtype: mx.Dtype) -> str:
    for name, (_, mxd) in DTYPES.items():
        if mxd == dtype:
            return name
    raise CodecError(f"arrays of dtype {dtype} cannot travel between nodes")


def encode(a: mx.array) -> pb.Tensor:
    """mx array (any shape) -> Tensor. Evaluates `a`."""
    name = dtype_name(a.dtype)
    carrier = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
    data = np.ascontiguousarray(np.asarray(carrier)).astype(DTYPES[name][0], copy=False).tobytes()
    return pb.Tensor(dtype=name, shape=list(a.shape), data=data)


def encode_numpy(a: np.ndarray) -> pb.Tensor:
    """numpy array of a non-bf16 dtype -> Tensor (used for index tensors)."""
    for name, (npd, _) in DTYPES.items():
        if name != "bfloat16" and np.dtype(a.dtype).newbyteorder("<") == npd.newbyteorder("<"):
            data = np.ascontiguousarray(a, dtype=npd).tobytes()
            return pb.Tensor(dtype=name, shape=list(a.shape), data=data)
    raise CodecError(f"arrays of dtype {a.dtype} cannot travel between nodes")


def to_numpy(t: pb.Tensor) -> np.ndarray:
    """Tensor -> numpy view of its bytes (bf16 as uint16), shape and size checked. No MLX."""
    if t.dtype not in DTYPES:
        raise CodecError(f"unknown tensor dtype {t.dtype!r}")
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape):
        raise CodecError(f"negative dimension in tensor shape {shape}")
    if len(shape) > MAX_DIMS:
        raise CodecError(f"tensor of {len(shape)} dimensions; at most {MAX_DIMS}")
    npd = DTYPES[t.dtype][0]
    count = math.prod(shape)  # Python ints: a huge shape cannot wrap around to a small count
    if len(t.data) != count * npd.itemsize:
        raise CodecError(f"tensor of {t.dtype} {list(shape)} needs {count * npd.itemsize} bytes, got {len(t.data)}")
    return np.frombuffer(t.data, dtype=npd, count=count).reshape(shape)


def all_finite(t: pb.Tensor) -> bool:
    """No NaN or infinity in a float Tensor (checked on its bytes; bf16 by its exponent bits). No MLX."""
    a = to_numpy(t)
    if t.dtype == "bfloat16":
        return not bool(((a & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(a).all())


def decode(t: pb.Tensor) -> mx.array:
    """Tensor -> mx array (a copy), bit-exact."""
    arr = mx.array(to_numpy(t))
    return arr.view(mx.bfloat16) if t.dtype == "bfloat16" else arr


def format_records(records) -> str:
    """(layer, expert) pairs -> "layer:expert,..." (the DATA_LOSS trailer)."""
    return ",".join(f"{int(layer)}:{int(expert)}" for layer, expert in records)


def parse_records(text: str) -> tuple[tuple[int, int], ...]:
    """The DATA_LOSS trailer back into (layer, expert) pairs; malformed entries are skipped."""
    out = []
    for item in text.split(","):
        layer, _, expert = item.partition(":")
        if layer.strip().isdigit() and expert.strip().isdigit():
            out.append((int(layer), int(expert)))
    return tuple(out)
