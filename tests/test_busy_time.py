"""The flash's busy time: the union of loads' spans, whatever order they land in, and what a cache
counts from its own reads."""

from __future__ import annotations

import time

import pytest
from flashmesh.node.busy_time import BusyTime
from flashmesh.node.cache import ExpertCache
from flashmesh.node.store_reader import ExpertStore


def test_overlapping_spans_count_once_in_any_order():
    busy = BusyTime()  # four loads in flight, from 0.0, 1.0, 5.0 and 5.5
    busy.add(5.0, 6.0, in_flight_since=0.0)  # lands first, though two started before it
    busy.add(0.0, 2.0, in_flight_since=1.0)
    busy.add(1.0, 3.0, in_flight_since=5.5)  # joins [0, 2]; [0, 3] can no longer grow and is folded
    assert busy.seconds == pytest.approx(3.0 + 1.0) and len(busy._spans) == 1
    busy.add(5.5, 7.0, in_flight_since=None)  # runs on from [5, 6]
    assert busy.seconds == pytest.approx(3.0 + 2.0) and not busy._spans


def test_a_span_inside_another_adds_nothing():
    busy = BusyTime()
    busy.add(0.0, 10.0, in_flight_since=0.5)
    busy.add(1.0, 2.0, in_flight_since=None)
    assert busy.seconds == pytest.approx(10.0)


def test_folding_keeps_the_list_short_and_the_sum():
    busy = BusyTime()
    for i in range(1000):  # one load at a time, as demand reads come: each folds at once
        busy.add(2.0 * i, 2.0 * i + 1.0, in_flight_since=None)
    assert busy.seconds == pytest.approx(1000.0) and len(busy._spans) == 0


@pytest.fixture
def store(models):
    _, path = models.get("qwen3_moe")
    with ExpertStore(path) as s:
        yield s


def test_the_cache_counts_its_reads_busy_time(store):
    spec = store.manifest.layers[0]
    cache = ExpertCache(store, budget_bytes=store.manifest.expert_bytes_total)
    start = time.perf_counter()
    cache.prefetch(spec.layer, spec.experts[2:6])
    cache.acquire(spec.layer, spec.experts[:2])  # reads the two misses, and lands the read-ahead too
    elapsed = time.perf_counter() - start
    stats = cache.stats
    assert 0 < stats.flash_busy_seconds <= elapsed
    assert stats.flash_busy_seconds <= store.stats.seconds + 1e-9  # overlapping loads count once
