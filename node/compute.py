"""Expert compute on MLX: one batched call per layer (per wave) with mlx-lm's own expert module.

The kernel is the model's own SwitchGLU (or SwitchMLP, or any variant) taken from an mlx-lm model
built lazily from the store's config: its activation, biases and quantization are exactly the
model's. For each call its stacked weights are the cache's slabs (node/slab.py) and the expert
ids are renumbered to the experts' slots, so the arithmetic is mlx-lm's and nothing is copied.
"""

from __future__ import annotations

import dataclasses
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmesh.node.cache import ExpertCache
from flashmesh.node.cache_stats import LOCAL, ExpertStats
from flashmesh.node.experts import expert_templates
from mlx.utils import tree_unflatten

__all__ = ["LocalExperts", "expert_templates"]

_EMPTY = mx.zeros((0,))


class LocalExperts:
    """The in-process expert backend (coordinator.dispatch.ExpertBackend, and the compute of a node):
    cache + store + mlx-lm's expert modules as kernels."""

    def __init__(self, cache: ExpertCache, templates: dict[int, nn.Module]) -> None:
        self.cache = cache
        self.templates = templates
        self._hint: tuple[int, list[int]] | None = None  # (layer, experts) to read once a wave is pinned

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, D], indices [N, k] (expert ids) -> per-pair expert outputs [N, k, D]."""
        table = self.cache.resident_slots(layer)
        if table is not None:  # every expert of this layer is in RAM for good: keep the graph lazy
            self.cache.count_hits(indices)
            return self._call(layer, x, table[indices])
        idx = np.array(indices)  # forces the graph up to the router: the experts must be known
        n, k = idx.shape
        waves = self.cache.plan_waves(layer, np.unique(idx).tolist())
        if len(waves) == 1:
            return self._run_wave(layer, waves[0], x, idx, issue_hint=True)
        self._hint = None  # this layer alone overflows the budget: reading ahead would only thrash
        # Budget smaller than this call's experts: compute wave by wave, each on its own pairs.
        flat = idx.reshape(-1)
        out = None
        for wave in waves:
            pairs = np.nonzero(np.isin(flat, wave))[0]
            y = self._run_wave(layer, wave, x[mx.array(pairs // k)], flat[pairs].reshape(-1, 1))  # [P, 1, D]
            if out is None:
                out = mx.zeros((n * k, y.shape[-1]), dtype=y.dtype)
            out[mx.array(pairs)] = y[:, 0]
            mx.eval(out)
        return out.reshape(n, k, -1)

    def _call(self, layer: int, x: mx.array, slots: mx.array) -> mx.array:
        """mlx-lm's expert module on the cache's slabs: x [N, D], slots [N, k] -> [N, k, D] (lazy)."""
        module = self.templates[layer]
        slab = self.cache.slab(layer).arrays  # name -> [slots, ...], the cache's own memory
        module.update(tree_unflatten(list(slab.items())))
        y = module(x, slots)
        module.update(tree_unflatten([(name, _EMPTY) for name in slab]))  # the graph holds what it needs
        return y

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading `experts` of `layer` into the cache (as many as fit); does not wait."""
        self.cache.prefetch(layer, sorted(set(experts)))

    def stats(self) -> ExpertStats:
        return ExpertStats({LOCAL: dataclasses.replace(self.cache.stats)}, {LOCAL: self.cache.budget_bytes})

    def close(self) -> None:
        """Land the reads in flight (read-ahead), so the store can be closed after."""
        self._hint = None
        self.cache.drain()

    def hint(self, layer: int, experts: list[int]) -> None:
        """Predicted experts of an upcoming layer: read them as soon as the next compute() has pinned
        its own experts, so that the reads overlap its compute without evicting what it needs."""
        if self._hint is not None:
            self.prefetch(*self._hint)
        self._hint = (layer, list(experts))

    def _run_wave(
        self, layer: int, wave: list[int], x: mx.array, idx: np.ndarray, *, issue_hint: bool = False
    ) -> mx.array:
        slots = self.cache.acquire(layer, wave)
        try:
            if issue_hint and self._hint is not None:
                hinted, self._hint = self._hint, None
                if hinted[0] != layer:
                    self.prefetch(*hinted)
            start = time.perf_counter()
            slot = np.zeros(max(wave) + 1, dtype=np.uint32)
            slot[wave] = [slots[e] for e in wave]
            y = self._call(layer, x, mx.array(slot[idx]))  # [N, k, D]
            mx.eval(y)  # before release: a slot refilled later must not be read by a pending graph
            self.cache.stats.compute_seconds += time.perf_counter() - start
            return y
        finally:
            self.cache.release(layer, wave)
