"""Slab memory beyond one MLX dimension (32-bit shapes): a cache budget of many GiB puts more than
2 GiB in one tensor's slots, which a 1-D buffer cannot hold; the slots stay page aligned, zeros,
and shared between MLX and the byte views the reads land through."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.node import slab
from flashmesh.node.slab import PAGE, _aligned_zeros


def _check(array: mx.array, shape: tuple[int, ...], row_bytes: int) -> None:
    assert array.shape == shape
    host = np.array(array.view(mx.uint8), copy=False).reshape(shape[0], -1)
    assert host.ctypes.data % PAGE == 0 and host.shape[1] == row_bytes
    assert not host[0].any() and not host[-1].any()
    host[-1, -4:] = 7  # a write through the byte view is what MLX computes on
    assert int(array.view(mx.uint8).reshape(shape[0], -1)[-1, -1]) == 7


@pytest.mark.parametrize("row_bytes", [PAGE, 3 * PAGE, 6 * 1024 + 8, 4096 * 5 + 2])
def test_a_buffer_past_the_dimension_limit_is_a_run_of_rows(monkeypatch, row_bytes):
    monkeypatch.setattr(slab, "MAX_DIMENSION", 64 * PAGE)  # an odd width factor above 1, at a small size
    slots = 200
    dtype = mx.uint16 if row_bytes % 2 == 0 else mx.uint8
    shape = (slots, row_bytes // dtype.size)
    _check(_aligned_zeros(shape, dtype, row_bytes), shape, row_bytes)


def test_a_tensor_of_more_than_2_gib_of_slots():
    shape = (1030, 512, 1024)  # one 2 MiB fp32 tensor per expert: 2.01 GiB of slots
    row_bytes = 512 * 1024 * 4
    _check(_aligned_zeros(shape, mx.float32, row_bytes), shape, row_bytes)
