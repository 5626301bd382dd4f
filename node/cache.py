"""ExpertCache: the node's RAM cache of expert weights under a hard byte budget.

Entries are whole experts (all tensors of one record) as MLX arrays. The experts one batched call
needs are pinned while it runs; everything else is evictable by the policy: "lru"; "lfu" (least
often used over a decayed history, ties broken by recency); or "cyclic": layers are visited in a
fixed order every token, so the entry whose layer comes up last from now is the one needed furthest
in the future (Belady's choice for that order); ties broken by recency; or "auto" (the default):
"cyclic" when the budget holds fewer experts than one token uses (top-k x MoE layers), where LRU
evicts every entry just before it is needed again and hits nothing, and "lru" otherwise. Chosen by
replaying routing traces (docs/benchmarks.md). The cache never holds more than
`budget_bytes` of expert weights, counting records whose reads are still in flight (prefetches):
a request larger than the budget is split into waves by `plan_waves`, each of which fits.

Prefetch: `prefetch(layer, experts)` reserves room and submits the reads to the store's threads
without waiting; the next `acquire` of that layer (or `drain`) turns them into entries, on the
caller's thread. Statistics say how many prefetched experts were then used (misses covered) and
how many were evicted or never asked for (wasted reads).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from node.store_format import StoreError
from node.store_reader import ExpertStore, PendingRead

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0  # bytes fetched from flash (whole records)
    io_seconds: float = 0.0
    compute_seconds: float = 0.0
    peak_bytes: int = 0
    prefetched: int = 0  # experts read ahead of need
    prefetch_used: int = 0  # of those, asked for by acquire (each one a miss avoided)
    prefetch_wasted: int = 0  # of those, evicted or dropped before anyone asked for them
    prefetch_wait_seconds: float = 0.0  # time acquire waited on reads already in flight

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


POLICIES = ("auto", "lru", "lfu", "cyclic")


class ExpertCache:
    def __init__(self, store: ExpertStore, *, budget_bytes: int, policy: str = "lru", lfu_decay: float = 0.999) -> None:
        minimum = store.manifest.min_budget_bytes
        if budget_bytes < minimum:
            raise StoreError(
                f"RAM budget {format_bytes(budget_bytes)} is below this model's minimum "
                f"{format_bytes(minimum)} (the top-k experts of one layer); pass --ram-budget {minimum} or more"
            )
        if policy not in POLICIES:
            raise StoreError(f"unknown cache policy {policy!r}; pick one of {', '.join(POLICIES)}")
        self.store = store
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.lfu_decay = lfu_decay  # per acquire: older uses count for less
        self._entries: OrderedDict[Key, dict[str, mx.array]] = OrderedDict()  # recency order, oldest first
        self._pinned: set[Key] = set()
        self._pending: dict[int, PendingRead] = {}  # layer -> prefetch reads in flight
        self._unused_prefetch: set[Key] = set()  # prefetched, not yet asked for
        self._freq: dict[Key, float] = {}
        self._clock = 1.0  # LFU: a use at time t adds clock(t); the clock grows by 1/decay per acquire
        self._position = {spec.layer: i for i, spec in enumerate(sorted(store.manifest.layers, key=lambda s: s.layer))}
        self._now = 0  # position of the layer last acquired
        self.bytes = 0  # resident + in flight
        self.stats = CacheStats()

    def _cost(self, layer: int) -> int:
        return self.store.layer(layer).payload_bytes

    def __contains__(self, key: Key) -> bool:
        """Resident, or read ahead and in flight."""
        pending = self._pending.get(key[0])
        return key in self._entries or (pending is not None and key[1] in pending.raws)

    def plan_waves(self, layer: int, experts: list[int]) -> list[list[int]]:
        """Split `experts` into groups that each fit the budget; resident experts go first."""
        capacity = max(1, self.budget_bytes // self._cost(layer))
        ordered = sorted(experts, key=lambda e: (layer, e) not in self)
        return [ordered[i : i + capacity] for i in range(0, len(ordered), capacity)]

    def _touch(self, key: Key) -> None:
        self._entries.move_to_end(key)
        if self.effective_policy == "lfu":
            self._freq[key] = self._freq.get(key, 0.0) + self._clock

    def _collect(self, layer: int) -> None:
        """Turn this layer's prefetch reads into entries (waits for the ones still in flight)."""
        pending = self._pending.pop(layer, None)
        if pending is None:
            return
        start = time.perf_counter()
        try:
            fetched = pending.result()
        except StoreError as e:
            # A read-ahead is a hint: drop the whole batch and give its room back; a corrupt record
            # is reported by the acquire that really needs it, to the request that asked for it.
            log.warning("read-ahead of layer %d dropped: %s", layer, e)
            fetched = {}
            self.bytes -= len(pending.raws) * self._cost(layer)
            self._unused_prefetch -= {(layer, e) for e in pending.raws}
        self.stats.prefetch_wait_seconds += time.perf_counter() - start
        self.stats.io_seconds += time.perf_counter() - start
        for e, arrays in fetched.items():
            self._entries[(layer, e)] = arrays  # bytes were reserved at submission

    def drain(self) -> None:
        """Finish every prefetch in flight (before closing the store, or to measure)."""
        for layer in list(self._pending):
            self._collect(layer)

    def acquire(self, layer: int, experts: list[int]) -> dict[int, dict[str, mx.array]]:
        """Make `experts` resident (reading misses in parallel) and pin them until release()."""
        cost = self._cost(layer)
        if len(experts) * cost > self.budget_bytes:
            raise ValueError("acquire() asked for more than the budget; use plan_waves()")
        self._collect(layer)
        self._now = self._position.get(layer, 0)
        self._clock /= self.lfu_decay
        if self._clock > 1e100:  # renormalise the decayed counts before floats overflow
            self._freq = {k: v / self._clock for k, v in self._freq.items()}
            self._clock = 1.0
        missing = [e for e in experts if (layer, e) not in self._entries]
        hits = len(experts) - len(missing)
        self.stats.hits += hits
        self.stats.misses += len(missing)
        for e in experts:
            key = (layer, e)
            if key in self._unused_prefetch:
                self._unused_prefetch.discard(key)
                self.stats.prefetch_used += 1  # a hit (no blocking read) that prefetch paid for
            if key in self._entries:
                self._touch(key)
            self._pinned.add(key)
        if missing:
            before = self.store.stats.bytes, self.store.stats.seconds
            try:
                self._make_room(len(missing) * cost)
                fetched = self.store.read(layer, missing)
            except BaseException:
                self.release(layer, experts)  # a failed read (corrupt record) must not leave pins behind
                raise
            self.stats.bytes_read += self.store.stats.bytes - before[0]
            self.stats.io_seconds += self.store.stats.seconds - before[1]
            for e, arrays in fetched.items():
                self._entries[(layer, e)] = arrays
                self._touch((layer, e))
                self.bytes += cost
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.bytes)
        return {e: self._entries[(layer, e)] for e in experts}

    def prefetch(self, layer: int, experts: list[int]) -> list[int]:
        """Start reading `experts` of `layer` that are neither resident nor in flight, as many as fit
        after evicting unpinned entries; return the experts submitted. Does not wait."""
        if layer in self._pending:
            self._collect(layer)  # one batch in flight per layer
        cost = self._cost(layer)
        wanted = [e for e in dict.fromkeys(experts) if (layer, e) not in self._entries]
        room = self._free_room(cost, limit=len(wanted))
        wanted = wanted[:room]
        if not wanted:
            return []
        # A read-ahead evicts what is needed furthest in layer order, whatever the policy: under LRU
        # the oldest entries are those of the very next layers, which a prefetch must not displace.
        self._make_room(len(wanted) * cost, policy="cyclic")
        self.bytes += len(wanted) * cost
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.bytes)
        self._pending[layer] = self.store.submit(layer, wanted)
        self.stats.bytes_read += len(wanted) * self.store.layer(layer).record_size
        self.stats.prefetched += len(wanted)
        self._unused_prefetch.update((layer, e) for e in wanted)
        return wanted

    def _free_room(self, cost: int, *, limit: int) -> int:
        """How many records of `cost` could be made room for by evicting unpinned entries."""
        evictable = sum(self._cost(k[0]) for k in self._entries if k not in self._pinned)
        return min(limit, max(0, (self.budget_bytes - self.bytes + evictable) // cost))

    def release(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self._pinned.discard((layer, e))

    @property
    def effective_policy(self) -> str:
        if self.policy != "auto":
            return self.policy
        manifest = self.store.manifest
        per_token = manifest.top_k * len(manifest.layers)
        capacity = self.budget_bytes // max(s.payload_bytes for s in manifest.layers)
        return "cyclic" if capacity < per_token else "lru"

    def _victims(self, policy: str | None = None):
        policy = policy or self.effective_policy
        if policy == "lru":
            yield from list(self._entries)
        elif policy == "lfu":
            yield from sorted(self._entries, key=lambda k: self._freq.get(k, 0.0))  # stable: LRU breaks ties
        else:
            n = len(self._position)
            # distance, in layers, until key's layer is computed again (0 = the layer after this one)
            yield from sorted(self._entries, key=lambda k: -((self._position.get(k[0], 0) - self._now - 1) % n))

    def _make_room(self, needed: int, *, policy: str | None = None) -> None:
        self._evict(needed, policy)
        if self.bytes + needed > self.budget_bytes and self._pending:
            self.drain()  # reads in flight hold reserved room: land them so they can be evicted
            self._evict(needed, policy)
        if self.bytes + needed > self.budget_bytes:
            raise RuntimeError("expert cache: pinned experts leave no room (a bug in wave planning)")

    def _evict(self, needed: int, policy: str | None) -> None:
        for key in self._victims(policy):
            if self.bytes + needed <= self.budget_bytes:
                return
            if key in self._pinned:
                continue
            del self._entries[key]
            self.bytes -= self._cost(key[0])
            self.stats.evictions += 1
            if key in self._unused_prefetch:
                self._unused_prefetch.discard(key)
                self.stats.prefetch_wasted += 1

    def close_stats(self) -> CacheStats:
        """Count prefetched experts nobody asked for as wasted; return the statistics."""
        self.drain()
        self.stats.prefetch_wasted += len(self._unused_prefetch)
        self._unused_prefetch.clear()
        return self.stats


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}".replace(".00", "")
        n /= 1024
    return f"{n}"


def parse_bytes(text: str) -> int:
    """'2GB', '512MiB', '1.5g', '1048576' -> bytes (GB = 10^9, GiB = 2^30; a bare G means GiB)."""
    units = {
        "": 1,
        "b": 1,
        "k": 1024,
        "kb": 1000,
        "kib": 1024,
        "m": 1024**2,
        "mb": 1000**2,
        "mib": 1024**2,
        "g": 1024**3,
        "gb": 1000**3,
        "gib": 1024**3,
        "t": 1024**4,
        "tb": 1000**4,
        "tib": 1024**4,
    }
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    unit = s[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise StoreError(f"cannot read {text!r} as a size; write it like 2GB, 512MiB or 1073741824") from None
    if unit not in units or value < 0:
        raise StoreError(f"cannot read {text!r} as a size; write it like 2GB, 512MiB or 1073741824")
    return int(value * units[unit])
