"""The expert dispatch on its own: it replaces every routed-expert module of mlx-lm's model, keeps
SwitchGLU's call signature and shapes, hands the backend flat [N, D] / [N, k] work, and hints the
next layer's experts (its router's top-k) when lookahead is on."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.dispatch import ExpertDispatch, bind_backend, set_lookahead
from flashmesh.coordinator.engine import load_dense_model
from flashmesh.node.cache_stats import ExpertStats
from flashmesh.node.expert_banks import find_expert_banks
from mlx_lm import load


class ModuleBackend:
    """An ExpertBackend computing with the modules the dispatch replaced, recording every call."""

    def __init__(self, modules) -> None:
        self.modules = modules
        self.calls: list[tuple[int, tuple, tuple]] = []
        self.hints: list[tuple[int, list[int]]] = []
        self.closed = False

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        self.calls.append((layer, x.shape, indices.shape))
        return self.modules[layer](x, indices)

    def hint(self, layer: int, experts: list[int]) -> None:
        self.hints.append((layer, experts))

    def stats(self) -> ExpertStats:
        return ExpertStats({}, {})

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def dispatched(models):
    """The store's model with its banks swapped for dispatches, bound to a ModuleBackend."""
    _, store = models.get("qwen3_moe")
    model, manifest, templates = load_dense_model(store)
    backend = ModuleBackend(templates)
    return model, manifest, backend


def _dispatches(model) -> dict[int, ExpertDispatch]:
    return {m.layer: m for m in model.modules() if isinstance(m, ExpertDispatch)}


def test_every_routed_expert_bank_is_replaced(models, dispatched):
    model, manifest, backend = dispatched
    src, _ = models.get("qwen3_moe")
    original, _ = load(str(src))
    banks = find_expert_banks(original)
    assert sorted(b.layer for b in banks) == sorted(s.layer for s in manifest.layers) == sorted(backend.modules)
    assert bind_backend(model, backend) == len(banks)
    assert sorted(_dispatches(model)) == sorted(backend.modules)
    assert find_expert_banks(model) == []  # none of mlx-lm's expert modules is left in the model


def test_shapes_and_outputs_are_the_replaced_modules(dispatched):
    model, manifest, backend = dispatched
    bind_backend(model, backend)
    layer = manifest.layers[0].layer
    dispatch, original = _dispatches(model)[layer], backend.modules[layer]
    d, k = model.args.hidden_size, manifest.layers[0].top_k
    x = mx.random.normal((2, 3, d))  # [B, T, D]
    indices = mx.array(np.random.default_rng(0).integers(0, 16, size=(2, 3, k)), dtype=mx.uint32)  # [B, T, k]
    y = dispatch(x, indices)
    assert y.shape == (2, 3, k, d)  # [B, T, k, D], as SwitchGLU returns
    assert backend.calls == [(layer, (2, 3, d), (2, 3, k))]  # the backend gets the call as it is: no reshapes
    np.testing.assert_array_equal(np.array(y), np.array(original(x, indices)))


def test_lookahead_hints_the_next_layers_router_choice(dispatched):
    model, manifest, backend = dispatched
    bind_backend(model, backend, lookahead=True)
    layers, k = sorted(backend.modules), manifest.layers[0].top_k
    dispatches = _dispatches(model)
    assert [dispatches[n].lookahead is not None for n in layers] == [True] * (len(layers) - 1) + [False]
    here = dispatches[layers[0]]
    x = mx.random.normal((5, model.args.hidden_size))
    here(x, mx.zeros((5, k), dtype=mx.uint32))
    logits = here.lookahead.router(x)  # the next layer's gate: [N, E]
    ranked = np.argsort(-np.array(logits.astype(mx.float32)), axis=-1)[:, :k]  # [N, k], best first
    ((hinted_layer, hinted),) = backend.hints
    assert hinted_layer == layers[1] and sorted(hinted) == np.unique(ranked).tolist()
    best_rank = [min(int(np.nonzero(row == e)[0][0]) for row in ranked if e in row) for e in hinted]
    assert best_rank == sorted(best_rank)  # most likely first: the reads least likely needed go last
    assert set_lookahead(model, enabled=False) == 0 and all(d.lookahead is None for d in dispatches.values())
    backend.hints.clear()
    here(x, mx.zeros((5, k), dtype=mx.uint32))
    assert backend.hints == []
