"""Slabs: the expert cache's memory, one contiguous MLX array per tensor name with a slot per expert.

mlx-lm's expert modules compute with stacked weights [E, ...] and `gather_mm`/`gather_qmm` over
expert ids. Keeping the cached experts in such stacks (slot = position in the stack) lets a layer
call hand the stacks to the module as they are, with expert ids renumbered to slots: nothing is
copied per call. A record is copied into its slot once, when it is read (by the reader threads,
straight from the record's bytes: node/read_queue.py). Layers whose experts have the same tensors
(names, shapes, dtypes) share one slab.

A slab with a slot for every expert of its layers never evicts; each expert then has a fixed home
slot (its layers' experts in order, one layer after another), so a layer of a full store is a
contiguous run of slots in expert order: `view(layer)` gives mlx-lm's own stacked arrays [E, ...]
as views of the slab, and a call on them is exactly mlx-lm's.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from flashmesh.node.huge_pages import advise_huge_pages, resident_huge_bytes
from flashmesh.node.store_format import LayerSpec
from flashmesh.protos.codec import DTYPES

Signature = tuple[tuple[str, tuple[int, ...], str], ...]
PAGE = 4096


MAX_DIMENSION = 2**31 - 1  # MLX shapes are 32-bit


def _aligned_zeros(shape: tuple[int, ...], dtype: mx.Dtype, row_bytes: int) -> mx.array:
    """mx.zeros(shape) whose memory starts on a page, so each slot of `row_bytes` is page aligned when
    that is: a window of whole rows of a larger 2-D uint8 buffer [rows, width] (an evaluated slice
    shares its buffer). Two dimensions because one cannot hold more than 2 GiB (a budget of many GiB
    puts that much in one tensor's slots). The width is an odd factor m, just enough for the rows to
    fit a dimension, times the powers of 2 that the page skew and `row_bytes` share, so that some
    page-aligned start falls on a row; the window is padded to whole `row_bytes` rows (m - 1 at most)."""
    slots, nbytes = shape[0], shape[0] * row_bytes
    twos = (row_bytes & -row_bytes).bit_length() - 1  # 2-adic valuation of row_bytes
    m = 1
    while (nbytes + (m - 1) * row_bytes + 3 * m * PAGE) // m > MAX_DIMENSION:  # rows of width, at most
        m += 2
    rows = -(-(nbytes + (m - 1) * row_bytes + 2 * m * PAGE) // (m * PAGE)) * m  # of PAGE bytes, m | rows
    raw = mx.zeros((rows, PAGE), dtype=mx.uint8)
    mx.eval(raw)
    skew = (-np.array(raw, copy=False).ctypes.data) % PAGE
    skew_twos = (skew & -skew).bit_length() - 1 if skew else 12
    width = (1 << min(twos, skew_twos, 12)) * m  # divides rows * PAGE, and row_bytes * m
    # a start = skew (mod PAGE) that the odd m divides (the powers of 2 divide skew and PAGE already)
    start = skew + ((-skew * pow(PAGE, -1, m)) % m) * PAGE
    unit = math.lcm(width, row_bytes)  # at most m * row_bytes, and nbytes is whole row_bytes
    window = -(-nbytes // unit) * unit
    assert start % width == 0 and start + window <= rows * PAGE
    flat = raw.reshape(rows * PAGE // width, width)[start // width : (start + window) // width]
    array = flat.reshape(window // row_bytes, row_bytes)[:slots].view(dtype).reshape(shape)
    mx.eval(array)
    return array


def signature(spec: LayerSpec) -> Signature:
    """What decides whether two layers' experts can share slots."""
    return tuple((t.name, tuple(t.shape), t.dtype) for t in spec.tensors)


class Slab:
    """`slots` experts' tensors as arrays [slots, *shape]; free slots are handed out and taken back."""

    def __init__(self, specs: list[LayerSpec], *, slots: int, huge_pages: bool = True) -> None:
        """`huge_pages`: back the slots with transparent huge pages where Linux has them, else with 4 KiB
        pages (node/huge_pages.py)."""
        spec = specs[0]
        self.payload_bytes = spec.payload_bytes
        self.slots = slots
        self.experts = sum(len(s.experts) for s in specs)  # slots >= experts: nothing is ever evicted
        self.arrays = {t.name: _aligned_zeros((slots, *t.shape), DTYPES[t.dtype][1], t.nbytes) for t in spec.tensors}
        # byte views of the same memory [slots, bytes]: records are read or copied in through these, MLX
        # computes on `arrays`; page aligned, so a slot whose tensors are whole pages takes O_DIRECT reads
        self.rows = {name: np.array(a.view(mx.uint8), copy=False).reshape(slots, -1) for name, a in self.arrays.items()}
        advised = [advise_huge_pages(r.ctypes.data, r.nbytes, huge=huge_pages) for r in self.rows.values()]
        self.huge_pages = huge_pages
        self.huge_ranges = [r for r in advised if r is not None and huge_pages]  # for huge_page_bytes
        self._home: dict[tuple[int, int], int] | None = None
        self._base: dict[int, int] = {}
        if slots >= self.experts:
            self._home, base = {}, 0
            for s in specs:
                self._base[s.layer] = base
                self._home.update(((s.layer, e), base + i) for i, e in enumerate(s.experts))
                base += len(s.experts)
            self._taken: set[int] = set()
        self._free = list(range(slots - 1, -1, -1))

    def huge_page_bytes(self) -> int:
        """Bytes of this slab that huge pages back now (they are faulted in as records land)."""
        return resident_huge_bytes(self.huge_ranges)

    @property
    def holds_all(self) -> bool:
        return self._home is not None

    @property
    def free(self) -> int:
        return self.slots - len(self._taken) if self._home is not None else len(self._free)

    def take(self, key: tuple[int, int]) -> int:
        """A free slot for `key` = (layer, expert): its home slot when the slab holds every expert."""
        if self._home is None:
            return self._free.pop()
        slot = self._home[key]
        self._taken.add(slot)
        return slot

    def give_back(self, slot: int) -> None:
        if self._home is None:
            self._free.append(slot)
        else:
            self._taken.discard(slot)

    def view(self, spec: LayerSpec) -> dict[str, mx.array] | None:
        """The layer's experts as mlx-lm's stacked arrays [num_experts, ...], views of this slab's memory
        (expert id = index), when the slab holds them all in order; else None."""
        if self._home is None or spec.experts != list(range(spec.num_experts)):
            return None
        base = self._base[spec.layer]
        views = {name: a[base : base + spec.num_experts] for name, a in self.arrays.items()}
        mx.eval(list(views.values()))  # a slice of whole rows shares the slab's buffer: no copy
        return views

    def fill(self, slot: int, tensors: dict[str, mx.array]) -> None:
        """Copy one expert's tensors (arrays made on this thread) into `slot`. Callers must have evaluated
        every graph that reads this slot's previous expert (the cache pins experts until then)."""
        for name, array in tensors.items():
            self.rows[name][slot] = np.array(array.view(mx.uint8), copy=False).reshape(-1)
