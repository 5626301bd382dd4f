"""ExpertCache on its own: the byte budget, pins, waves, hit and miss counts, and each eviction policy,
on the records of a tiny packed store."""

from __future__ import annotations

import pytest
from flashmesh.node.cache import ExpertCache
from flashmesh.node.cache_stats import CacheStats, ExpertStats
from flashmesh.node.store_format import Manifest
from flashmesh.node.store_reader import ExpertStore
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.errors import UserError


@pytest.fixture
def store(models):
    _, path = models.get("qwen3_moe")
    with ExpertStore(path) as s:
        yield s


def _use(cache: ExpertCache, layer: int, experts: list[int]) -> dict[int, int]:
    slots = cache.acquire(layer, experts)
    cache.release(layer, experts)
    return slots


def test_budget_below_one_layers_top_k_names_the_minimum(store):
    minimum = store.manifest.min_budget_bytes
    with pytest.raises(UserError, match=f"--ram-budget {minimum}"):
        ExpertCache(store, budget_bytes=minimum - 1)
    with pytest.raises(UserError, match="unknown cache policy"):
        ExpertCache(store, budget_bytes=minimum, policy="fifo")


def test_never_holds_more_than_the_budget(store):
    m: Manifest = store.manifest
    budget = 2 * m.min_budget_bytes + m.layers[0].payload_bytes // 2  # not a whole number of experts
    cache = ExpertCache(store, budget_bytes=budget)
    for _ in range(2):
        for spec in m.layers:
            for wave in cache.plan_waves(spec.layer, spec.experts):
                _use(cache, spec.layer, wave)
                assert cache.bytes <= budget
    stats = cache.stats
    assert 0 < stats.peak_bytes <= budget and stats.evictions > 0
    assert stats.bytes_read == stats.misses * m.layers[0].record_size  # whole records, one per miss


def test_hits_misses_and_bytes_read(store):
    spec = store.manifest.layers[0]
    cache = ExpertCache(store, budget_bytes=store.manifest.expert_bytes_total)
    first = _use(cache, spec.layer, [0, 1])
    assert (cache.stats.hits, cache.stats.misses, cache.stats.bytes_read) == (0, 2, 2 * spec.record_size)
    assert _use(cache, spec.layer, [1, 0]) == first  # the same slots: nothing was read or moved
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)
    assert cache.stats.hit_rate == 0.5 and cache.stats.io_seconds > 0


def test_pinned_experts_are_never_evicted(store):
    m = store.manifest
    k, (a, b) = m.top_k, (m.layers[0].layer, m.layers[1].layer)
    cache = ExpertCache(store, budget_bytes=m.min_budget_bytes)  # room for exactly one layer's top-k
    pinned = list(range(k))
    cache.acquire(a, pinned)
    with pytest.raises(RuntimeError, match="pinned"):
        cache.acquire(b, [0])
    assert all((a, e) in cache for e in pinned)
    with pytest.raises(ValueError, match="plan_waves"):
        cache.acquire(a, list(range(k + 1)))
    cache.release(a, pinned)
    _use(cache, b, [0])  # released: now one of them makes room
    assert (b, 0) in cache and sum((a, e) in cache for e in pinned) == k - 1


def test_waves_fit_the_budget_and_put_resident_experts_first(store):
    m = store.manifest
    spec = m.layers[0]
    cache = ExpertCache(store, budget_bytes=m.min_budget_bytes)
    _use(cache, spec.layer, [5])
    waves = cache.plan_waves(spec.layer, list(range(2 * m.top_k)))
    assert len(waves) == 2 and all(len(w) <= m.top_k for w in waves)
    assert waves[0][0] == 5 and sorted(sum(waves, [])) == list(range(2 * m.top_k))


def _two_layers_of_room(store, policy: str) -> ExpertCache:
    return ExpertCache(store, budget_bytes=2 * store.manifest.min_budget_bytes, policy=policy)


def test_lru_evicts_the_least_recently_used(store):
    k, layer = store.manifest.top_k, store.manifest.layers[0].layer
    cache = _two_layers_of_room(store, "lru")
    old, recent, new = list(range(k)), list(range(k, 2 * k)), list(range(2 * k, 3 * k))
    _use(cache, layer, old)
    _use(cache, layer, recent)
    _use(cache, layer, old)  # old is now the most recent
    _use(cache, layer, new)
    assert all((layer, e) in cache for e in old + new) and not any((layer, e) in cache for e in recent)


def test_lfu_keeps_what_is_used_often(store):
    k, layer = store.manifest.top_k, store.manifest.layers[0].layer
    cache = _two_layers_of_room(store, "lfu")
    often, once, new = list(range(k)), list(range(k, 2 * k)), list(range(2 * k, 3 * k))
    for _ in range(3):
        _use(cache, layer, often)
    _use(cache, layer, once)  # the most recent, but used once
    _use(cache, layer, new)
    assert all((layer, e) in cache for e in often) and not any((layer, e) in cache for e in once)


def test_auto_is_lfu_at_every_budget(store):
    """The default: LFU with aging, chosen on realistic routing traces (docs/benchmarks.md)."""
    m = store.manifest
    per_token = m.top_k * len(m.layers)
    small = ExpertCache(store, budget_bytes=m.min_budget_bytes)
    assert small.policy == "auto" and small.effective_policy == "lfu"  # the documented default
    big = ExpertCache(store, budget_bytes=per_token * m.layers[0].payload_bytes)
    assert big.effective_policy == "lfu"
    assert ExpertCache(store, budget_bytes=m.min_budget_bytes, policy="lru").effective_policy == "lru"


def test_statistics_over_a_window_and_across_nodes():
    before = CacheStats(hits=1, misses=3, bytes_read=300, io_seconds=1.0, peak_bytes=10)
    after = CacheStats(hits=5, misses=4, bytes_read=400, io_seconds=1.5, peak_bytes=20)
    window = after.since(before)
    assert (window.hits, window.misses, window.bytes_read, window.peak_bytes) == (4, 1, 100, 20)
    assert window.hit_rate == 0.8 and window.read_gbps == pytest.approx(100 / 0.5 / 1e9)
    node = CacheStats.from_proto(pb.NodeStats(hits=2, misses=2, bytes_read=7, peak_cache_bytes=5, prefetched=1))
    assert (node.hits, node.misses, node.bytes_read, node.peak_bytes, node.prefetched) == (2, 2, 7, 5, 1)
    both = ExpertStats({"a": after, "b": node}, {"a": 100, "b": 50})
    assert both.total.hits == 7 and both.total.peak_bytes == 25 and both.ram_budget_bytes == 150
    assert both.since(ExpertStats({"a": before}, {"a": 100})).total.hits == 4 + 2  # a node new in the window
    # a node that restarted in the window counts from zero again: its window is what it did since
    restarted = CacheStats(hits=2, misses=1, bytes_read=100, io_seconds=0.1, peak_bytes=5).since(after)
    assert (restarted.hits, restarted.misses, restarted.bytes_read) == (2, 1, 100)
