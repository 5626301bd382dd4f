"""The dispatch for experts held as a Python list of per-expert modules (dbrx), without touching
the architecture's code.

The block owning the list keeps its own routing and combining code. Its list becomes an
`ExpertList` and the block runs twice per call: first every `experts[e](x)` is recorded (and
answered with zeros), then all recorded (rows, expert) pairs go to the backend in one batched
call, then the block runs again and each `experts[e](x)` returns its computed rows. The router is
deterministic, so the second run asks for exactly the pairs the first recorded (checked).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmesh.node.expert_banks import submodule


class ExpertList:
    """Stands in for the list of expert modules: `experts[e](x [..., D]) -> [..., D]`."""

    def __init__(self, layer: int, num_experts: int) -> None:
        self.layer = layer
        self.num_experts = num_experts
        self.backend = None  # an ExpertBackend, bound by coordinator.dispatch.bind_backend
        self._recorded: list[tuple[int, mx.array]] | None = None
        self._outputs: list[tuple[int, tuple, mx.array]] | None = None

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, expert: int):
        return partial(self._call, int(expert))

    def __iter__(self):
        return (self[e] for e in range(self.num_experts))

    def _call(self, expert: int, x: mx.array) -> mx.array:
        if self._outputs is None:
            if self._recorded is None:
                raise RuntimeError(f"layer {self.layer}: an expert was called outside its block")
            self._recorded.append((expert, x))
            return mx.zeros(x.shape, dtype=x.dtype)
        want, shape, y = self._outputs.pop()
        if want != expert or shape != tuple(x.shape):
            raise RuntimeError(f"layer {self.layer}: the block routed differently when run again")
        return y

    def record(self) -> None:
        self._recorded, self._outputs = [], None

    def compute_recorded(self) -> None:
        """One backend call for every (row, expert) pair the block asked for."""
        pairs, self._recorded = self._recorded, None
        self._outputs = []
        if not pairs:
            return
        d = pairs[0][1].shape[-1]
        rows = [x.reshape(-1, d) for _, x in pairs]
        counts = [r.shape[0] for r in rows]
        ids = mx.array(np.repeat([e for e, _ in pairs], counts).astype(np.uint32))[:, None]  # [P, 1]
        y = self.backend.compute(self.layer, mx.concatenate(rows), ids)[:, 0]  # [P, D]
        starts = np.cumsum([0, *counts])
        outputs = [(e, tuple(x.shape), y[starts[i] : starts[i + 1]].reshape(x.shape)) for i, (e, x) in enumerate(pairs)]
        self._outputs = outputs[::-1]  # popped from the end, in call order

    def finish(self) -> None:
        leftover = self._outputs
        self._recorded = self._outputs = None
        if leftover:
            raise RuntimeError(f"layer {self.layer}: the block asked for fewer experts when run again")


class _ReplayingBlock:
    """Mixed in before the owning block's own class: runs the block twice around one batched call."""

    expert_list_name = ""

    def __call__(self, *args, **kwargs):
        experts: ExpertList = getattr(self, self.expert_list_name)
        experts.record()
        super().__call__(*args, **kwargs)  # only the recorded pairs are kept
        experts.compute_recorded()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            experts.finish()


_REPLAYING: dict[tuple[type, str], type] = {}


def install_list_dispatch(model: nn.Module, path: str, layer: int) -> tuple[list, ExpertList]:
    """Swap the list at `path` for an ExpertList; return (the list of expert modules, the stand-in)."""
    parent, _, name = path.rpartition(".")
    block = submodule(model, parent) if parent else model
    entries = block[name]
    stand_in = ExpertList(layer, len(entries))
    setattr(block, name, stand_in)  # a plain attribute: the experts' parameters leave the tree
    cls = type(block)
    if (cls, name) not in _REPLAYING:
        _REPLAYING[cls, name] = type(cls.__name__, (_ReplayingBlock, cls), {"expert_list_name": name})
    block.__class__ = _REPLAYING[cls, name]
    return entries, stand_in


def expert_lists(model: nn.Module) -> list[ExpertList]:
    """Every ExpertList installed in `model`."""
    return [getattr(m, m.expert_list_name) for m in model.modules() if isinstance(m, _ReplayingBlock)]
