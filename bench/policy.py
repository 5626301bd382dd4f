"""Eviction policies measured on routing traces: replay the (layer, experts) requests of a real
generation through a byte-budgeted cache model of each policy and count hits."""

from __future__ import annotations

from collections import OrderedDict

from flashmesh.node.cache import POLICIES, effective_policy

Trace = list[tuple[int, list[int]]]  # one (layer, experts) per acquire, in order


def record_trace(cache) -> Trace:
    """Wrap `cache.acquire` so that every request is appended to the returned list."""
    trace: Trace = []
    acquire = cache.acquire

    def recording(layer: int, experts: list[int]):
        trace.append((layer, list(experts)))
        return acquire(layer, experts)

    cache.acquire = recording
    return trace


def simulate(trace: Trace, *, capacity: int, policy: str, decay: float = 0.999) -> float:
    """Hit rate of `policy` (node/cache.py's) holding `capacity` experts (all layers' experts cost the same)."""
    if policy not in POLICIES:
        raise ValueError(policy)
    policy = effective_policy(policy)
    capacity = max(capacity, max((len(e) for _, e in trace), default=1))  # one request must fit
    positions = {layer: i for i, layer in enumerate(sorted({layer for layer, _ in trace}))}
    n = len(positions)
    entries: OrderedDict[tuple[int, int], None] = OrderedDict()
    freq: dict[tuple[int, int], float] = {}
    clock, hits, total = 1.0, 0, 0
    for layer, experts in trace:
        now = positions[layer]
        clock /= decay
        keys = [(layer, e) for e in experts]
        for key in keys:
            total += 1
            if key in entries:
                hits += 1
                entries.move_to_end(key)
            freq[key] = freq.get(key, 0.0) + clock
        pinned = set(keys)
        for key in keys:
            if key in entries:
                continue
            while len(entries) >= capacity:
                if policy == "lru":
                    order = list(entries)
                elif policy == "lfu":
                    order = sorted(entries, key=lambda k: freq.get(k, 0.0))
                else:
                    order = sorted(entries, key=lambda k: -((positions[k[0]] - now - 1) % n))
                victim = next(k for k in order if k not in pinned)
                del entries[victim]
            entries[key] = None
    return hits / total if total else 0.0
