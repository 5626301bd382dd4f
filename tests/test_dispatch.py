"""The expert dispatch on its own: it replaces every routed-expert module of mlx-lm's model, keeps
SwitchGLU's call signature and shapes, hands the backend flat [N, D] / [N, k] work, and hints the
next layer's experts (its router's top-k) when lookahead is on."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.dispatch import ExpertDispatch, install_dispatch, set_lookahead
from flashmesh.node.cache_stats import ExpertStats
from flashmesh.node.experts import find_expert_modules
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
def model(models):
    src, _ = models.get("qwen3_moe")
    model, _ = load(str(src))
    return model


def test_every_routed_expert_module_is_replaced(model):
    before = find_expert_modules(model)
    backend = ModuleBackend({})
    replaced = install_dispatch(model, backend)
    backend.modules = replaced
    assert len(replaced) == len(before) > 0
    dispatches = [m for m in model.modules() if isinstance(m, ExpertDispatch)]
    assert sorted(d.layer for d in dispatches) == sorted(replaced)
    assert find_expert_modules(model) == {}  # none of mlx-lm's expert modules is left in the model


def test_shapes_and_outputs_are_the_replaced_modules(model):
    backend = ModuleBackend({})
    backend.modules = install_dispatch(model, backend)
    layer = sorted(backend.modules)[0]
    dispatch = next(m for m in model.modules() if isinstance(m, ExpertDispatch) and m.layer == layer)
    original = backend.modules[layer]
    d = model.args.hidden_size
    x = mx.random.normal((2, 3, d))  # [B, T, D]
    indices = mx.array(np.random.default_rng(0).integers(0, 16, size=(2, 3, 4)), dtype=mx.uint32)  # [B, T, k]
    y = dispatch(x, indices)
    assert y.shape == (2, 3, 4, d)  # [B, T, k, D], as SwitchGLU returns
    assert backend.calls == [(layer, (6, d), (6, 4))]  # the backend sees flat rows: [N, D], [N, k]
    np.testing.assert_array_equal(np.array(y), np.array(original(x, indices)))


def test_lookahead_hints_the_next_layers_router_choice(model):
    backend = ModuleBackend({})
    backend.modules = install_dispatch(model, backend, lookahead=True)
    layers = sorted(backend.modules)
    dispatches = {m.layer: m for m in model.modules() if isinstance(m, ExpertDispatch)}
    assert [dispatches[n].lookahead is not None for n in layers] == [True] * (len(layers) - 1) + [False]
    here = dispatches[layers[0]]
    x = mx.random.normal((5, model.args.hidden_size))
    here(x, mx.zeros((5, 4), dtype=mx.uint32))
    logits = here.lookahead.router(x)  # the next layer's gate: [N, E]
    expected = np.unique(np.argsort(-np.array(logits.astype(mx.float32)), axis=-1)[:, :4]).tolist()
    assert backend.hints == [(layers[1], expected)]
    assert set_lookahead(model, enabled=False) == 0 and all(d.lookahead is None for d in dispatches.values())
    backend.hints.clear()
    here(x, mx.zeros((5, 4), dtype=mx.uint32))
    assert backend.hints == []
