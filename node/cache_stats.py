"""Counters of an expert cache, and the figures derived from them (hit rate, read rate): the one
place they are computed, for the in-process cache, a node's Stats reply and a cluster's sum."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from flashmesh.protos import flashmesh_pb2 as pb

# CacheStats field -> the pb.NodeStats field that carries it
_ON_THE_WIRE = {
    "hits": "hits",
    "misses": "misses",
    "evictions": "evictions",
    "bytes_read": "bytes_read",
    "io_seconds": "io_seconds",
    "compute_seconds": "compute_seconds",
    "peak_bytes": "peak_cache_bytes",
    "prefetched": "prefetched",
    "prefetch_used": "prefetch_used",
}


@dataclass
class CacheStats:
    """What an expert cache did: counters since it was made (or, from `since`, over a window)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0  # bytes fetched from flash (whole records)
    io_seconds: float = 0.0
    compute_seconds: float = 0.0  # waiting on MLX at streamed layers' one sync (the router's choice and before)
    peak_bytes: int = 0
    prefetched: int = 0  # experts read ahead of need
    prefetch_used: int = 0  # of those, asked for by acquire (each one a miss avoided)
    prefetch_wasted: int = 0  # of those, evicted or dropped before anyone asked for them
    prefetch_dropped: int = 0  # read-aheads taken back before they started: their layer came, without them
    prefetch_wait_seconds: float = 0.0  # time acquire waited on reads already in flight
    flash_busy_seconds: float = 0.0  # wall time with any read in flight (node/busy_time.py)
    filled: int = 0  # experts read in the background because the budget holds every expert

    @property
    def prefetch_coverage(self) -> float:
        """Share of would-be misses that prefetch turned into hits."""
        total = self.prefetch_used + self.misses
        return self.prefetch_used / total if total else 0.0

    @property
    def wasted_per_useful(self) -> float:
        return self.prefetch_wasted / self.prefetch_used if self.prefetch_used else 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / self.io_seconds / 1e9 if self.io_seconds else 0.0

    @classmethod
    def from_proto(cls, s: pb.NodeStats) -> CacheStats:
        """A node's cache counters as its Stats RPC reports them."""
        return cls(**{name: getattr(s, wire) for name, wire in _ON_THE_WIRE.items()})

    def proto_fields(self) -> dict:
        """The counters a node's Stats reply carries (pb.NodeStats fields)."""
        return {wire: getattr(self, name) for name, wire in _ON_THE_WIRE.items()}

    def since(self, before: CacheStats) -> CacheStats:
        """The counters over the window from `before` to now; the peak is the peak so far. Counters
        that went back mean the cache was made again in the window (its node restarted): then the
        window holds all it counted since."""
        deltas = {f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)}
        if any(v < 0 for name, v in deltas.items() if name != "peak_bytes"):
            deltas = {f.name: getattr(self, f.name) for f in fields(self)}
        return CacheStats(**{**deltas, "peak_bytes": self.peak_bytes})

    def __add__(self, other: CacheStats) -> CacheStats:
        """Several caches as one (a cluster's nodes): counters and peaks summed."""
        return CacheStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


LOCAL = "local"  # the key of the in-process cache in ExpertStats


@dataclass(frozen=True)
class ExpertStats:
    """The expert caches behind a backend, so far: the in-process one ("local"), or each node's (by
    node id, as its Stats RPC last answered). One shape for both, so one report serves every run."""

    caches: Mapping[str, CacheStats]
    budgets: Mapping[str, int]  # RAM budget bytes, same keys

    @property
    def total(self) -> CacheStats:
        return sum(self.caches.values(), CacheStats())

    @property
    def ram_budget_bytes(self) -> int:
        return sum(self.budgets.values())

    def since(self, before: ExpertStats) -> ExpertStats:
        """What each cache did after `before` was taken (peaks: so far)."""
        caches = {k: s.since(before.caches.get(k, CacheStats())) for k, s in self.caches.items()}
        return ExpertStats(caches, self.budgets)
