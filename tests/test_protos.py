"""The generated protocol modules match flashmesh.proto, and the codec is bit-exact and strict."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.codec import CodecError, decode, encode, encode_numpy, to_numpy
from flashmesh.protos.generate import PROTO_DIR, generate


def test_generated_modules_match_proto(tmp_path):
    for fresh in generate(tmp_path):
        committed = PROTO_DIR / Path(fresh).name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} drifted; run python -m flashmesh.protos.generate"
        )


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.uint32, mx.uint8])
def test_codec_round_trip_is_bit_exact(dtype):
    a = (mx.random.normal((3, 7)) * 100).astype(dtype)
    t = encode(a)
    assert t.dtype == str(dtype).split(".")[-1] and list(t.shape) == [3, 7]
    assert len(t.data) == a.nbytes  # raw bytes, never repeated floats
    b = decode(pb.Tensor.FromString(t.SerializeToString()))
    assert b.dtype == dtype and b.shape == a.shape
    assert np.array_equal(
        np.array(a.view(mx.uint16) if dtype == mx.bfloat16 else a),
        np.array(b.view(mx.uint16) if dtype == mx.bfloat16 else b),
    )


def test_codec_handles_non_contiguous_and_scalars():
    a = mx.arange(12, dtype=mx.float32).reshape(3, 4).T  # a transposed view
    assert np.array_equal(np.array(decode(encode(a))), np.array(a))
    s = mx.array(3.5)
    assert decode(encode(s)).item() == 3.5
    assert list(to_numpy(encode_numpy(np.array([1, 2], dtype=np.int32)))) == [1, 2]


@pytest.mark.parametrize(
    "tensor,needle",
    [
        (pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "unknown tensor dtype"),
        (pb.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 12), "needs 16 bytes"),
        (pb.Tensor(dtype="float32", shape=[-1], data=b""), "negative"),
    ],
)
def test_codec_rejects_malformed(tensor, needle):
    with pytest.raises(CodecError, match=needle):
        decode(tensor)
