"""Routing statistics (bench/routing.py) on hand-made traces with answers worked out by hand, and
the tracing backend on a real engine run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.policy import simulate
from bench.routing import (
    belady_hit_rate,
    load_entropy,
    lookahead_accuracy,
    overlap,
    requests,
    reuse_distances,
    reuse_histogram,
    statistics,
    top_share,
)

# One layer (7), 4 experts, top-2; four tokens.
STEPS = [{7: np.array(s)} for s in ([0, 1], [0, 1], [2, 3], [0, 2])]


def test_load_balance_statistics():
    p = np.array([3, 2, 2, 1]) / 8  # uses of experts 0..3
    assert load_entropy(STEPS, 7, experts=4) == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert top_share(STEPS, 7, experts=4, fraction=0.25) == pytest.approx(3 / 8)  # expert 0
    uniform = [{0: np.array([t % 4])} for t in range(8)]
    assert load_entropy(uniform, 0, experts=4) == pytest.approx(1.0)


def test_overlap_and_reuse_distance():
    assert overlap(STEPS, 7) == pytest.approx((2 / 2 + 0 / 2 + 1 / 2) / 3)
    distances, cold = reuse_distances(STEPS, 7)
    assert sorted(distances) == [1, 1, 1, 2] and cold == 4  # 0: t1 (1), t3 (2); 1: t1 (1); 2: t3 (1)
    hist = reuse_histogram(distances, cold)
    assert hist["1"] == pytest.approx(3 / 8) and hist["2"] == pytest.approx(1 / 8) and hist["cold"] == 0.5


def test_belady_and_lru_hit_rates():
    trace = requests(STEPS)
    assert trace == [(7, [0, 1]), (7, [0, 1]), (7, [2, 3]), (7, [0, 2])]
    # capacity 2: t1 hits both, t2 evicts 0 and 1, t3 misses 0 and hits 2
    assert simulate(trace, capacity=2, policy="lru") == pytest.approx(3 / 8)
    assert belady_hit_rate(trace, capacity=2) == pytest.approx(3 / 8)
    # capacity 3: at t2 Belady evicts 1 (never used again) and keeps 0 (used at t3); LRU evicts 0
    assert belady_hit_rate(trace, capacity=3) == pytest.approx(4 / 8)
    assert simulate(trace, capacity=3, policy="lru") == pytest.approx(3 / 8)
    assert belady_hit_rate(trace, capacity=4) == pytest.approx(4 / 8)  # only the 4 first uses miss


def test_belady_is_never_below_any_policy():
    rng = np.random.default_rng(0)
    steps = [{layer: rng.choice(8, size=2, replace=False) for layer in (0, 1)} for _ in range(60)]
    trace = requests(steps)
    for capacity in (2, 4, 7, 12):
        ideal = belady_hit_rate(trace, capacity=capacity)
        for policy in ("lru", "lfu", "cyclic"):
            assert ideal >= simulate(trace, capacity=capacity, policy=policy) - 1e-12


def test_lookahead_accuracy_and_summary():
    steps = [{0: np.array([0, 1]), 1: np.array([2, 3])}, {0: np.array([0, 2]), 1: np.array([1, 3])}]
    predicted = [{1: np.array([2, 0])}, {1: np.array([1, 3])}]  # half right, then all right
    assert lookahead_accuracy(steps, predicted, 1) == pytest.approx(0.75)
    assert lookahead_accuracy(steps, predicted, 0) is None
    s = statistics(steps, predicted, experts=4, top_k=2)
    assert s["overall"]["lookahead_accuracy"] == pytest.approx(0.75)
    assert s["per_layer"][0]["overlap"] == pytest.approx(0.5) and s["per_layer"][1]["overlap"] == pytest.approx(0.5)
    assert s["overall"]["chance_overlap"] == 0.5 and s["tokens"] == 2


def test_tracer_records_what_the_dispatch_receives(models):
    """The trace is mlx-lm's own routing: per token and layer the router's top-k, tokens unchanged."""
    import mlx.core as mx
    from flashmesh.coordinator.engine import open_model
    from flashmesh.coordinator.generate import SamplingParams, generate
    from flashmesh.coordinator.options import ModelOptions
    from flashmesh.node.store_format import Manifest

    from bench.routing_trace import install_tracer

    _, store = models.get("qwen3_moe")
    manifest = Manifest.load(store)
    prompt = [1, 5, 9, 12, 3, 7]
    options = ModelOptions(store=store, ram_budget=manifest.expert_bytes_total)
    plain = open_model(options)
    expected = generate(plain.model, plain.tokenizer, prompt, SamplingParams(max_tokens=5)).tokens
    plain.close()
    streaming = open_model(options)
    try:
        tracer = install_tracer(streaming.model, streaming.backend)
        assert generate(streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=5)).tokens == expected
        steps, predicted = tracer.take_steps()
        layers = sorted(s.layer for s in manifest.layers)
        assert len(steps) >= len(prompt) + 4 and all(sorted(s) == layers for s in steps)
        assert all(len(s[layer]) == manifest.top_k for s in steps for layer in layers)
        assert all(sorted(p) == layers[1:] for p in predicted)  # every layer but the first is predicted
        # the first layer's choice for the prompt, recomputed from its router on its own input
        block = streaming.model.model.layers[layers[0]]
        h = streaming.model.model.embed_tokens(mx.array([prompt]))
        x = block.post_attention_layernorm(h + block.self_attn(block.input_layernorm(h), mask="causal"))
        inds = np.array(mx.argpartition(-block.mlp.gate(x)[0], kth=manifest.top_k - 1, axis=-1)[:, : manifest.top_k])
        for t in range(len(prompt)):
            assert sorted(steps[t][layers[0]].tolist()) == sorted(inds[t].tolist())
    finally:
        streaming.close()
