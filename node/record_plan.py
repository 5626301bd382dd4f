"""RecordPlan: how one layer's records land in a slab (the read queue's and the AIO ring's input),
and the errors a record's read ends in, worded once for both readers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from flashmesh.node.store_format import RecordError


@dataclass(frozen=True, eq=False)
class RecordPlan:
    """How one layer's records land in a slab: where to read, what to check, where each tensor goes."""

    layer: int
    fd: int
    record_size: int
    offsets: dict[int, int]  # expert -> byte offset of its record in the layer file
    checksums: dict[int, str] | None  # expert -> xxh3 (None: no verification)
    tensors: tuple[tuple[int, int, np.ndarray], ...]  # (offset in record, bytes, slab rows [slots, bytes])
    file: str  # for error messages
    remedy: str
    scatter: bool = False  # read straight into the slot: every tensor is whole pages at a page offset

    @cached_property
    def gaps(self) -> list[tuple[int, int]]:
        """(offset, length) of the record's bytes that belong to no tensor (padding), in order."""
        out, at = [], 0
        for offset, nbytes, _ in sorted(self.tensors, key=lambda t: t[0]):
            if offset > at:
                out.append((at, offset - at))
            at = offset + nbytes
        if at < self.record_size:
            out.append((at, self.record_size - at))
        return out

    @cached_property
    def staging_bytes(self) -> int:
        """Bytes of staging buffer a record needs: its padding when scattered, else all of it."""
        return sum(length for _, length in self.gaps) if self.scatter else self.record_size

    @cached_property
    def layout(self) -> list[tuple[int, int, np.ndarray | None]]:
        """(offset, length, slab rows, or None for padding) covering the record in order."""
        parts = [(off, n, rows) for off, n, rows in self.tensors] + [(off, n, None) for off, n in self.gaps]
        return sorted(parts, key=lambda p: p[0])

    @cached_property
    def pieces(self) -> list[tuple[int, int, int]]:
        """(address of slot 0's row, bytes per slot, length) of each piece in file order; address 0
        for padding. A scattered record's iovecs are these, at `address + slot * stride`."""
        return [(0, 0, n) if rows is None else (rows.ctypes.data, rows.strides[0], n) for _, n, rows in self.layout]

    @cached_property
    def checksum_values(self) -> dict[int, int] | None:
        """expert -> the record's xxh3 as an integer (the store keeps it in hex)."""
        return None if self.checksums is None else {e: int(h, 16) for e, h in self.checksums.items()}


def can_scatter(tensors, record_size: int, *, chunk_bytes: int, page: int) -> bool:
    """Whether records can be preadv'd straight into slab rows (one read per record, page-aligned pieces)."""
    return record_size <= chunk_bytes and all(off % page == 0 and n % page == 0 for off, n, _ in tensors)


def short_read(plan: RecordPlan, expert: int, got: int) -> RecordError:
    return RecordError(
        plan.layer,
        expert,
        f"short read ({got} of {plan.record_size} bytes); the store file is truncated, re-run `flashmesh pack`",
    )


def lost(plan: RecordPlan, expert: int, reason: str) -> RecordError:
    """EIO, a file gone from under us: this record is lost (DATA_LOSS)."""
    return RecordError(plan.layer, expert, f"cannot read {plan.file} ({reason}); {plan.remedy}")


def mismatch(plan: RecordPlan, expert: int) -> RecordError:
    return RecordError(
        plan.layer, expert, f"record checksum mismatch in {plan.file}; the flash copy is corrupt, {plan.remedy}"
    )
