"""Router lookahead prefetch and cache policies: tokens stay identical to mlx-lm, budget holds."""

from __future__ import annotations

import pytest
from flashmesh.coordinator.dispatch import set_lookahead
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest
from mlx_lm import load

from .conftest import PROMPT


@pytest.mark.parametrize("policy", ["auto", "lru", "lfu", "cyclic"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("which", ["quarter", "minimum"])
def test_lookahead_and_policy_match_mlx_lm(models, arch, policy, which):
    src, store = models.get(arch)
    ref_model, tokenizer = load(str(src))
    prompt = tokenizer.encode(PROMPT)
    reference = generate(ref_model, tokenizer, prompt, SamplingParams(max_tokens=10))
    manifest = Manifest.load(store)
    budget = {
        "quarter": max(manifest.expert_bytes_total // 4, manifest.min_budget_bytes),
        "minimum": manifest.min_budget_bytes,
    }[which]
    streaming = open_model(ModelOptions(store=store, ram_budget=budget))
    try:
        assert set_lookahead(streaming.model, enabled=True) > 0
        streaming.cache.policy = policy
        assert (
            generate(streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=10)).tokens
            == reference.tokens
        )
        stats = streaming.cache.close_stats()
        assert stats.peak_bytes <= budget  # in-flight prefetched records count against the budget
        if which == "quarter":
            assert stats.prefetched > 0 and stats.prefetch_used > 0
        assert stats.prefetch_used + stats.prefetch_wasted == stats.prefetched
    finally:
        streaming.close()


def test_prefetch_is_asynchronous_and_budgeted(models):
    _, store = models.get("qwen3_moe")
    manifest = Manifest.load(store)
    spec = manifest.layers[0]
    streaming = open_model(ModelOptions(store=store, ram_budget=manifest.min_budget_bytes))
    try:
        cache = streaming.cache
        submitted = cache.prefetch(spec.layer, list(range(spec.num_experts)))
        assert 0 < len(submitted) <= manifest.top_k  # only what the budget allows is in flight
        assert cache.bytes <= cache.budget_bytes
        slots = cache.acquire(spec.layer, submitted[:1])  # lands the reads on this thread
        cache.release(spec.layer, submitted[:1])
        assert set(slots) == {submitted[0]}
        assert cache.close_stats().prefetch_used == 1
    finally:
        streaming.close()


def test_cyclic_policy_evicts_the_layer_needed_last(models):
    """Layers come round in order: after layer 1, layer 1's experts are needed furthest ahead."""
    from flashmesh.node.cache import ExpertCache
    from flashmesh.node.store_reader import ExpertStore

    _, store_path = models.get("qwen3_moe")
    manifest = Manifest.load(store_path)
    layers, k = [s.layer for s in manifest.layers], manifest.top_k
    assert len(layers) >= 3
    with ExpertStore(store_path) as store:
        cache = ExpertCache(store, budget_bytes=2 * manifest.min_budget_bytes, policy="cyclic")
        for layer in layers[:3]:
            cache.acquire(layer, list(range(k)))
            cache.release(layer, list(range(k)))
        assert all((layers[2], e) in cache for e in range(k))  # just used, but last to be needed
        assert not any((layers[1], e) in cache for e in range(k))  # evicted when layer 2 came in
        assert all((layers[0], e) in cache for e in range(k))  # needed soonest after layer 2
        assert cache.effective_policy == "cyclic"
