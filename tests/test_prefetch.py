"""Router lookahead prefetch and cache policies: tokens stay identical to mlx-lm, budget holds."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from flashmesh.coordinator.dispatch import Lookahead, set_lookahead
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.cache import ExpertCache
from flashmesh.node.store_format import Manifest
from flashmesh.node.store_reader import ExpertStore
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


class _FixedRouter(nn.Module):
    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.logits = mx.array(logits)

    def __call__(self, x: mx.array) -> mx.array:
        return self.logits  # [N, E]


def test_lookahead_predicts_the_most_likely_experts_first():
    """Experts in order of their best rank in any row: the least likely are the last read ahead."""
    router = _FixedRouter([[0.1, 0.9, 0.5, 0.0, 0.7], [0.8, 0.0, 0.1, 0.6, 0.2]])
    assert Lookahead(1, router).predict(mx.zeros((2, 4)), 3) == [1, 0, 4, 3, 2]


def test_acquire_takes_back_the_read_aheads_it_does_not_need(models):
    """Read-aheads its layer turns out not to need that have not started are dropped, never read:
    the misses go first. Counters stay whole: what was prefetched was used or wasted, bytes read
    are the records really read."""
    _, path = models.get("qwen3_moe")
    with ExpertStore(path, read_ahead_bytes=1) as store:  # read-aheads one at a time
        spec = store.manifest.layers[1]
        cache = ExpertCache(store, budget_bytes=store.manifest.expert_bytes_total // 2)
        submitted = cache.prefetch(spec.layer, spec.experts[:-1])
        assert len(submitted) > 2
        needed = [submitted[0], spec.experts[-1]]  # one read ahead, one miss
        slots = cache.acquire(spec.layer, needed)
        for e, slot in slots.items():
            raw = store.read_raw(spec.layer, e)
            for t in spec.tensors:
                assert cache.slab(spec.layer).rows[t.name][slot].tobytes() == raw[t.offset : t.offset + t.nbytes]
        cache.release(spec.layer, needed)
        stats = cache.close_stats()
        assert stats.prefetch_dropped > 0
        assert stats.prefetched + stats.prefetch_dropped == len(submitted)
        assert stats.prefetch_used == 1 and stats.misses == 1
        assert stats.prefetch_used + stats.prefetch_wasted == stats.prefetched
        assert stats.bytes_read == (stats.prefetched + stats.misses) * store.record_bytes(spec.layer)
        assert cache.bytes <= cache.budget_bytes


class _Logged:
    """A store's load that logs when it is waited for."""

    def __init__(self, load, log: list) -> None:
        self._load, self._log = load, log

    def __getattr__(self, name):
        return getattr(self._load, name)

    def wait(self):
        self._log.append(("wait", self._load.layer))
        return self._load.wait()


def test_acquire_queues_the_next_read_aheads_before_it_waits(models):
    """acquire(read_ahead=...) submits the next layer's read-aheads behind its misses before it
    waits for them (the flash goes on to them as the misses land), and they evict nothing it pinned."""
    _, path = models.get("qwen3_moe")
    with ExpertStore(path) as store:
        first, second = store.manifest.layers[:2]
        events = []
        submit = store.load

        def load(layer, slots, slab, *, urgent):
            events.append(("load", layer, urgent))
            return _Logged(submit(layer, slots, slab, urgent=urgent), events)

        store.load = load
        k = store.manifest.top_k
        cache = ExpertCache(store, budget_bytes=2 * store.manifest.min_budget_bytes)  # two layers' top-k
        needed = first.experts[:k]
        slots = cache.acquire(first.layer, needed, read_ahead=(second.layer, second.experts))
        assert events[0] == ("load", first.layer, True)
        assert events.index(("wait", first.layer)) > events.index(("load", second.layer, False)) > 0
        assert events.count(("load", second.layer, False)) == k  # the room left, not the pinned experts'
        for e, slot in slots.items():
            raw = store.read_raw(first.layer, e)
            for t in first.tensors:
                assert cache.slab(first.layer).rows[t.name][slot].tobytes() == raw[t.offset : t.offset + t.nbytes]
        cache.release(first.layer, needed)
        assert cache.bytes <= cache.budget_bytes
        cache.close_stats()
