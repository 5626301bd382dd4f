"""Expert compute on MLX: one batched call per layer (per wave) with mlx-lm's own expert module.

The kernel is the model's own SwitchGLU (or SwitchMLP, or any variant) taken from an mlx-lm model
built lazily from the store's config: its activation, biases and quantization are exactly the
model's. Each layer's module is bound once to the cache's slabs (node/slab.py) and called with
expert ids renumbered to the experts' slots, so the arithmetic is mlx-lm's and nothing is copied.

Two paths per layer call:
- resident for good (the budget holds every expert of the layer's shape and all of this layer's
  are in): no sync, no pins, the graph stays lazy; in a full store the module is rebound to views
  of the slab in expert order and called with the router's ids as they are: mlx-lm's own graph.
- otherwise: the router's choice is read (the one sync per layer), the experts are pinned (misses
  read), and the call is queued (`mx.async_eval`) without waiting for it: the pins are released
  when the next call on this thread has checked that the output was computed (it usually was, as
  the next layer's router input depends on it), so the expert compute overlaps the building of the
  next layer's graph instead of a wait per layer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmesh.node.cache import ExpertCache
from flashmesh.node.cache_stats import LOCAL, ExpertStats
from flashmesh.node.experts import expert_templates
from mlx.utils import tree_unflatten

__all__ = ["LocalExperts", "expert_templates"]


class LocalExperts:
    """The in-process expert backend (coordinator.dispatch.ExpertBackend, and the compute of a node):
    cache + store + mlx-lm's expert modules as kernels."""

    def __init__(self, cache: ExpertCache, templates: dict[int, nn.Module]) -> None:
        self.cache = cache
        self.templates = templates
        self._hint: tuple[int, list[int]] | None = None  # (layer, experts) to read once a wave is pinned
        self._lazy: dict[int, Callable[[mx.array, mx.array], mx.array]] = {}  # layers resident for good
        self._held: list[tuple[int, list[int], mx.array]] = []  # (layer, wave, output): pinned until computed
        for layer, module in templates.items():
            module.update(tree_unflatten(list(cache.slab(layer).arrays.items())))  # the cache's own memory

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] (expert ids) -> per-pair expert outputs [..., k, D]."""
        lazy = self._lazy.get(layer) or self._go_lazy(layer)
        if lazy is not None:
            return lazy(x, indices)
        start = time.perf_counter()
        idx = np.array(indices)  # forces the graph up to the router: the experts must be known
        self.settle()
        self.cache.stats.compute_seconds += time.perf_counter() - start
        ids = idx.reshape(-1)
        wanted = sorted(set(ids.tolist())) if ids.size <= 256 else np.unique(ids).tolist()
        if len(wanted) <= self.cache.slab(layer).slots:
            y = self._run_wave(layer, wanted, x, indices, issue_hint=True)
            self.cache.fill(layer)  # when the budget holds every expert: read the layer's others behind
            return y
        self._hint = None  # this layer alone overflows the budget: reading ahead would only thrash
        # Budget smaller than this call's experts: compute wave by wave, each on its own pairs.
        k, lead = idx.shape[-1], idx.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [N, D]
        out = None
        for wave in self.cache.plan_waves(layer, wanted):
            pairs = np.nonzero(np.isin(ids, wave))[0]
            y = self._run_wave(layer, wave, x[mx.array(pairs // k)], mx.array(ids[pairs].reshape(-1, 1)))  # [P, 1, D]
            if out is None:
                out = mx.zeros((ids.size, y.shape[-1]), dtype=y.dtype)
            out[mx.array(pairs)] = y[:, 0]
            mx.eval(out)
        self.settle()
        return out.reshape(*lead, k, -1)

    def _go_lazy(self, layer: int) -> Callable[[mx.array, mx.array], mx.array] | None:
        """The lazy call for a layer that has just become resident for good (None while it is not)."""
        if not self.cache.resident_for_good(layer):
            return None
        module, cache = self.templates[layer], self.cache
        view = cache.resident_view(layer)
        if view is not None:  # mlx-lm's own arrays [E, ...]: the router's ids index them as they are
            module.update(tree_unflatten(list(view.items())))

            def call(x: mx.array, indices: mx.array) -> mx.array:
                cache.count_hits(indices)
                return module(x, indices)
        else:
            table = cache.resident_slots(layer)  # [num_experts] expert -> slot

            def call(x: mx.array, indices: mx.array) -> mx.array:
                cache.count_hits(indices)
                return module(x, table[indices])

        self._lazy[layer] = call
        return call

    def settle(self) -> None:
        """Release the pins of earlier calls once their outputs are computed (they usually are); the
        next call does it anyway, a caller that is done with its outputs may do it now."""
        if self._held:
            mx.eval([y for _, _, y in self._held])
            for layer, wave, _ in self._held:
                self.cache.release(layer, wave)
            self._held.clear()

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading `experts` of `layer` (most likely first) into the cache, as many as fit; does not wait."""
        self.settle()
        self.cache.prefetch(layer, experts)  # most likely first; the cache drops repeats

    def stats(self) -> ExpertStats:
        return ExpertStats({LOCAL: dataclasses.replace(self.cache.stats)}, {LOCAL: self.cache.budget_bytes})

    def close(self) -> None:
        """Land the reads in flight (read-ahead), so the store can be closed after."""
        self._hint = None
        self.cache.drain()

    def hint(self, layer: int, experts: list[int]) -> None:
        """Predicted experts of an upcoming layer: read them as soon as the next compute() has pinned
        its own experts and queued its misses, so that the reads follow those misses and overlap its
        compute without evicting what it needs."""
        if self._hint is not None:
            self.prefetch(*self._hint)
        self._hint = (layer, list(experts))

    def _run_wave(
        self, layer: int, wave: list[int], x: mx.array, ids: mx.array, *, issue_hint: bool = False
    ) -> mx.array:
        """mlx-lm's module on the slab for the pairs of x [..., D] and expert ids [..., k] (all in `wave`)."""
        self.settle()
        hinted = None
        if issue_hint:
            hinted, self._hint = self._hint, None
        self.cache.acquire(layer, wave, read_ahead=hinted)
        try:
            y = self.templates[layer](x, self.cache.slot_table(layer)[ids])  # [..., k, D]
        except BaseException:
            self.cache.release(layer, wave)
            raise
        mx.async_eval(y)  # computes while the caller builds what comes next
        self._held.append((layer, wave, y))
        return y
