"""Slabs: the expert cache's memory, one contiguous MLX array per tensor name with a slot per expert.

mlx-lm's expert modules compute with stacked weights [E, ...] and `gather_mm`/`gather_qmm` over
expert ids. Keeping the cached experts in such stacks (slot = position in the stack) lets a layer
call hand the stacks to the module as they are, with expert ids renumbered to slots: nothing is
copied per call. A record is copied into its slot once, when it is read. Layers whose experts have
the same tensors (names, shapes, dtypes) share one slab.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from flashmesh.node.store_format import LayerSpec
from flashmesh.protos.codec import DTYPES

Signature = tuple[tuple[str, tuple[int, ...], str], ...]


def signature(spec: LayerSpec) -> Signature:
    """What decides whether two layers' experts can share slots."""
    return tuple((t.name, tuple(t.shape), t.dtype) for t in spec.tensors)


class Slab:
    """`slots` experts' tensors as arrays [slots, *shape]; free slots are handed out and taken back."""

    def __init__(self, spec: LayerSpec, *, slots: int, experts: int) -> None:
        self.payload_bytes = spec.payload_bytes
        self.slots = slots
        self.experts = experts  # of every layer sharing this slab: slots >= experts means nothing is evicted
        self.arrays = {t.name: mx.zeros((slots, *t.shape), dtype=DTYPES[t.dtype][1]) for t in spec.tensors}
        mx.eval(list(self.arrays.values()))
        # byte views of the same memory: records are copied in through these, MLX computes on `arrays`
        self._bytes = {
            name: np.array(a.view(mx.uint8), copy=False).reshape(slots, -1) for name, a in self.arrays.items()
        }
        self._free = list(range(slots - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def fill(self, slot: int, tensors: dict[str, mx.array]) -> None:
        """Copy one expert's tensors (as read from flash) into `slot`. Callers must have evaluated
        every graph that reads this slot's previous expert (the cache pins experts until then)."""
        for name, array in tensors.items():
            self._bytes[name][slot] = np.array(array.view(mx.uint8), copy=False).reshape(-1)
