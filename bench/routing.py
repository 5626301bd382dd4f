"""Routing statistics of a token-by-token routing trace (what the dispatch received, per token).

A trace is one dict per token, MoE layer -> the k experts chosen for that token there, in token
order (a prefill chunk's rows are its tokens in order; a decode step is one token). Statistics:

- load entropy: entropy of the expert-use histogram of a layer / log(E) (1 = perfectly balanced)
- top-10% share: share of all uses that go to the most used 10% of a layer's experts
- token-to-token overlap: |chosen(t) & chosen(t+1)| / k, consecutive tokens, same layer
  (chance level k / E)
- reuse distance: tokens since the same expert of the same layer was last chosen
- hit rates of an ideal (Belady) and an LRU cache holding a share of all experts, replaying the
  trace token by token, layer by layer (each (token, layer) request pinned while it is served)
- lookahead accuracy: |predicted(l+1) & chosen(l+1)| / k, where predicted is layer l+1's router
  applied to layer l's expert input (what the engine's router lookahead reads ahead)
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from bench.policy import Trace, simulate

Steps = list[dict[int, np.ndarray]]  # per token: layer -> chosen experts [k]
REUSE_BUCKETS = ((1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 64), (65, 256), (257, None))
BUDGET_SHARES = (0.10, 0.25, 0.50)


def requests(steps: Steps) -> Trace:
    """The cache's view: one (layer, experts) request per token and layer, in execution order."""
    return [(layer, sorted(int(e) for e in chosen[layer])) for chosen in steps for layer in sorted(chosen)]


def load_entropy(steps: Steps, layer: int, *, experts: int) -> float:
    counts = np.bincount(np.concatenate([s[layer] for s in steps]), minlength=experts).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(experts))


def top_share(steps: Steps, layer: int, *, experts: int, fraction: float = 0.10) -> float:
    counts = np.sort(np.bincount(np.concatenate([s[layer] for s in steps]), minlength=experts))[::-1]
    return float(counts[: max(1, math.ceil(fraction * experts))].sum() / counts.sum())


def overlap(steps: Steps, layer: int) -> float:
    pairs = [(a[layer], b[layer]) for a, b in zip(steps, steps[1:], strict=False)]
    if not pairs:
        return 0.0
    return float(np.mean([len(np.intersect1d(a, b)) / len(a) for a, b in pairs]))


def reuse_distances(steps: Steps, layer: int) -> tuple[list[int], int]:
    """Tokens since each use's expert was last chosen in `layer`; and the number of first uses."""
    last: dict[int, int] = {}
    distances, cold = [], 0
    for t, chosen in enumerate(steps):
        for e in chosen[layer].tolist():
            if e in last:
                distances.append(t - last[e])
            else:
                cold += 1
            last[e] = t
    return distances, cold


def reuse_histogram(distances: list[int], cold: int) -> dict[str, float]:
    """Share of uses by reuse distance bucket (tokens), plus first uses ('cold')."""
    total = len(distances) + cold
    d = np.asarray(distances)
    out = {}
    for lo, hi in REUSE_BUCKETS:
        inside = (d >= lo) if hi is None else (d >= lo) & (d <= hi)
        out[f"{lo}+" if hi is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")] = float(inside.sum() / total)
    out["cold"] = cold / total
    return out


def belady_hit_rate(trace: Trace, *, capacity: int) -> float:
    """Hit rate of the ideal cache (evict the entry used furthest in the future) on `trace`."""
    flat = [(layer, e) for layer, experts in trace for e in experts]
    upcoming: list[int] = [0] * len(flat)  # position of the next use of the same key
    seen: dict[tuple[int, int], int] = {}
    for i in range(len(flat) - 1, -1, -1):
        upcoming[i] = seen.get(flat[i], math.inf)
        seen[flat[i]] = i
    cache: dict[tuple[int, int], float] = {}  # key -> its next use
    heap: list[tuple[float, tuple[int, int]]] = []  # (-next use, key), stale entries skipped
    hits = i = 0
    for layer, experts in trace:
        keys = [(layer, e) for e in experts]
        pinned = set(keys)
        for key in keys:
            if key in cache:
                hits += 1
            elif len(cache) >= capacity:
                kept = []
                while True:
                    far, victim = heapq.heappop(heap)
                    if cache.get(victim) != -far:
                        continue  # stale
                    if victim in pinned:
                        kept.append((far, victim))
                        continue
                    del cache[victim]
                    break
                for item in kept:
                    heapq.heappush(heap, item)
            cache[key] = upcoming[i]
            heapq.heappush(heap, (-upcoming[i], key))
            i += 1
    return hits / len(flat) if flat else 0.0


def lookahead_accuracy(steps: Steps, predicted: Steps, layer: int) -> float | None:
    """Mean |predicted & chosen| / k for `layer`, over tokens with a prediction for it."""
    pairs = [(p[layer], s[layer]) for s, p in zip(steps, predicted, strict=True) if layer in p]
    scores = [len(np.intersect1d(guess, chosen)) / len(chosen) for guess, chosen in pairs]
    return float(np.mean(scores)) if scores else None


def statistics(steps: Steps, predicted: Steps, *, experts: int, top_k: int) -> dict:
    """Every statistic above, per MoE layer and overall (means over layers; hit rates on the whole trace)."""
    layers = sorted(steps[0])
    per_layer = {}
    all_distances, all_cold = [], 0
    for layer in layers:
        distances, cold = reuse_distances(steps, layer)
        all_distances += distances
        all_cold += cold
        per_layer[layer] = {
            "load_entropy": load_entropy(steps, layer, experts=experts),
            "top10_share": top_share(steps, layer, experts=experts),
            "overlap": overlap(steps, layer),
            "median_reuse_distance": float(np.median(distances)) if distances else None,
            "lookahead_accuracy": lookahead_accuracy(steps, predicted, layer),
        }
    trace = requests(steps)
    total = experts * len(layers)
    hit_rates = {"belady": {}, "lru": {}}
    for share in BUDGET_SHARES:
        capacity = max(top_k, int(share * total))
        hit_rates["belady"][f"{share:g}"] = belady_hit_rate(trace, capacity=capacity)
        hit_rates["lru"][f"{share:g}"] = simulate(trace, capacity=capacity, policy="lru")
    accuracies = [v["lookahead_accuracy"] for v in per_layer.values() if v["lookahead_accuracy"] is not None]
    return {
        "tokens": len(steps),
        "per_layer": per_layer,
        "overall": {
            "load_entropy": float(np.mean([v["load_entropy"] for v in per_layer.values()])),
            "top10_share": float(np.mean([v["top10_share"] for v in per_layer.values()])),
            "overlap": float(np.mean([v["overlap"] for v in per_layer.values()])),
            "overlap_range": [
                min(v["overlap"] for v in per_layer.values()),
                max(v["overlap"] for v in per_layer.values()),
            ],
            "chance_overlap": top_k / experts,
            "lookahead_accuracy": float(np.mean(accuracies)) if accuracies else None,
            "distinct_experts_used": len({k for k in ((layer, e) for layer, ex in trace for e in ex)}),
        },
        "reuse_distance_tokens": reuse_histogram(all_distances, all_cold),
        "hit_rate_by_budget_share": hit_rates,
    }
