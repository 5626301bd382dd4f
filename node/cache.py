"""ExpertCache: the node's RAM cache of expert weights under a hard byte budget.

Entries are whole experts (all tensors of one record) as MLX arrays. The experts one batched call
needs are pinned while it runs; everything else is evictable by the policy: "lru"; "lfu" (least
often used over a decayed history, i.e. LFU with aging: a use counts 1/0.999 more than one a layer
call earlier; ties broken by recency); or "cyclic": layers are visited in a fixed order every
token, so the entry whose layer comes up last from now is the one needed furthest in the future
(Belady's choice for a pure cycle); ties broken by recency. "auto" (the default) is "lfu": replayed
on the routing of a model trained on English text and of big models made to route like it, it hits
more than LRU and cyclic at every budget from 5% to 75% of the experts, also below one token's
experts, where LRU hits nothing (docs/benchmarks.md). The cache never holds more than
`budget_bytes` of expert weights, counting records whose reads are still in flight (prefetches):
a request larger than the budget is split into waves by `plan_waves`, each of which fits.

Prefetch: `prefetch(layer, experts)` reserves room and submits the reads, one load per record,
most likely first, without waiting; the next `acquire` of that layer (or `drain`) turns them into
entries, on the caller's thread. That acquire first takes back the read-aheads it does not need
that have not started (the store keeps few read-aheads in flight: node/store_reader.py,
READ_AHEAD_BYTES) and reads its misses ahead of the rest, so a wrong guess costs flash time only
when the flash had time to spare. Statistics say how many prefetched experts were then used
(misses covered), how many were evicted or never asked for (wasted reads) and how many were taken
back unread (dropped).

Memory: entries live in slots of preallocated slabs (node/slab.py), allocated when the cache is made
(budget // expert bytes slots, at most one per expert), so the budget is the memory, and compute
uses the slabs in place. The store's reader threads read each record into a reused staging buffer,
check it and copy it into its reserved slot (node/read_queue.py); this thread only waits.

When a slab holds every expert of its shape (nothing is ever evicted), `fill(layer)` queues that
layer's other experts behind the demand reads (the in-process backend asks on a layer's first
streamed call), so every layer soon has all its experts resident and its calls go lazy like
mlx-lm's (node/compute.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import mlx.core as mx
import numpy as np
from flashmesh.node.busy_time import BusyTime
from flashmesh.node.cache_stats import CacheStats
from flashmesh.node.read_queue import Load
from flashmesh.node.slab import Slab, signature
from flashmesh.node.store_format import Manifest
from flashmesh.node.store_reader import ExpertStore
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import format_bytes

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (layer, expert)


POLICIES = ("auto", "lru", "lfu", "cyclic")


def effective_policy(policy: str) -> str:
    """The policy "auto" stands for (chosen by replaying routing traces, docs/benchmarks.md)."""
    return "lfu" if policy == "auto" else policy


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        *,
        budget_bytes: int,
        policy: str = "auto",
        lfu_decay: float = 0.999,
        huge_pages: bool = True,
    ) -> None:
        minimum = store.manifest.min_budget_bytes
        if budget_bytes < minimum:
            raise UserError(
                f"RAM budget {format_bytes(budget_bytes)} is below this model's minimum "
                f"{format_bytes(minimum)} (the top-k experts of one layer); pass --ram-budget {minimum} or more"
            )
        if policy not in POLICIES:
            raise UserError(f"unknown cache policy {policy!r}; pick one of {', '.join(POLICIES)}")
        self.store = store
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.lfu_decay = lfu_decay  # per acquire: older uses count for less
        # layer -> its slab (shared by same-shape layers)
        self._slabs = _make_slabs(store.manifest, budget_bytes, huge_pages=huge_pages)
        self._entries: OrderedDict[Key, int] = OrderedDict()  # -> slot; recency order, oldest first
        self._slot_of = {s.layer: np.full(s.num_experts, -1, dtype=np.int32) for s in store.manifest.layers}
        self._slot_arrays: dict[int, mx.array] = {}  # layer -> slot_of as an MLX array, made when asked for
        self._reserved: dict[Key, int] = {}  # slots of reads in flight
        self._pinned: set[Key] = set()
        self._pending: dict[int, list[Load]] = {}  # layer -> read-aheads in flight
        self._filling: set[int] = set()  # layers whose remaining experts were queued (slab holds all)
        self._unused_prefetch: set[Key] = set()  # prefetched, not yet asked for
        self._freq: dict[Key, float] = {}
        self._clock = 1.0  # LFU: a use at time t adds clock(t); the clock grows by 1/decay per acquire
        self._position = {spec.layer: i for i, spec in enumerate(sorted(store.manifest.layers, key=lambda s: s.layer))}
        self._now = 0  # position of the layer last acquired
        self.bytes = 0  # resident + in flight
        self._stats = CacheStats()
        self._tables: dict[int, mx.array] = {}  # layer -> expert -> slot, once it is resident for good
        self._uncounted: list[mx.array] = []  # expert ids of lazy calls, counted as hits when stats are read
        self._in_flight: dict[int, Load] = {}  # id -> every load submitted and not yet landed
        self._busy = BusyTime()  # the flash's time with reads in flight

    @property
    def stats(self) -> CacheStats:
        if self._uncounted:
            self._stats.hits += sum(len(np.unique(np.array(ids))) for ids in self._uncounted)
            self._uncounted.clear()
        return self._stats

    def resident_for_good(self, layer: int) -> bool:
        """Every expert of `layer` is resident in a slab that holds every expert of its shape, so
        nothing is ever evicted from it: a layer call needs neither a sync on the router's choice nor
        pins, and its graph stays lazy."""
        slab = self._slabs[layer]
        if not slab.holds_all:
            return False
        if self._pending.get(layer):
            self._collect(layer, ())  # fills that have landed become entries
        return bool((self._slot_of[layer][self.store.layer(layer).experts] >= 0).all())

    def resident_slots(self, layer: int) -> mx.array | None:
        """expert id -> slot [num_experts] for a layer that is resident for good; else None."""
        table = self._tables.get(layer)
        if table is None:
            if not self.resident_for_good(layer):
                return None
            table = self._tables[layer] = self.slot_table(layer)
        return table

    def resident_view(self, layer: int) -> dict[str, mx.array] | None:
        """For a layer resident for good whose experts sit in their home slots in expert order: its
        stacked arrays [num_experts, ...] as views of the slab (mlx-lm's own arrays, indexed by expert id)."""
        return self._slabs[layer].view(self.store.layer(layer)) if self.resident_for_good(layer) else None

    def slot_table(self, layer: int) -> mx.array:
        """expert id -> slot [num_experts] (uint32; experts not resident map to slot 0): valid for the
        experts pinned now, until released. A new array whenever the layer's entries change, so a graph
        built on an earlier one keeps the slots it was built with."""
        table = self._slot_arrays.get(layer)
        if table is None:
            table = self._slot_arrays[layer] = mx.array(np.maximum(self._slot_of[layer], 0).astype(np.uint32))
        return table

    def count_hits(self, indices: mx.array) -> None:
        """A lazy call's expert ids [..., k]: hits on resident experts (one row's top-k are distinct;
        more rows are counted by distinct experts when stats are read)."""
        if indices.size == indices.shape[-1]:
            self._stats.hits += indices.size
            return
        self._uncounted.append(indices)
        if len(self._uncounted) >= 4096:
            _ = self.stats

    def preload(self) -> int:
        """Read every expert whose slab holds its whole shape group (the budget covers them);
        return the number read. For comparisons with engines that load the whole model."""
        loads = []
        for spec in self.store.manifest.layers:
            if self._slabs[spec.layer].holds_all:
                wanted = [e for e in spec.experts if (spec.layer, e) not in self]
                if wanted:
                    loads.append(self._load(spec.layer, wanted, urgent=True))
        for reads in loads:  # every layer's reads were queued at once: the queue stays full
            self._land(reads, waited=True)
        return sum(len(r.slots) for r in loads)

    def _cost(self, layer: int) -> int:
        return self.store.layer(layer).payload_bytes

    def slab(self, layer: int) -> Slab:
        """The stacked arrays that hold `layer`'s cached experts (index them by the slots acquire returns)."""
        return self._slabs[layer]

    def __contains__(self, key: Key) -> bool:
        """Resident, or read ahead and in flight."""
        return key in self._entries or key in self._reserved

    def plan_waves(self, layer: int, experts: list[int]) -> list[list[int]]:
        """Split `experts` into groups that each fit the budget; resident experts go first."""
        capacity = self._slabs[layer].slots
        ordered = sorted(experts, key=lambda e: (layer, e) not in self)
        return [ordered[i : i + capacity] for i in range(0, len(ordered), capacity)]

    def _touch(self, key: Key) -> None:
        self._entries.move_to_end(key)
        if self.effective_policy == "lfu":  # "auto" is LFU too
            self._freq[key] = self._freq.get(key, 0.0) + self._clock

    def _load(self, layer: int, experts: list[int], *, urgent: bool) -> Load:
        """Reserve a slot for each of `experts` (room must have been made) and start reading them into it."""
        slab = self._slabs[layer]
        slots = {e: slab.take((layer, e)) for e in experts}
        self._reserved.update(((layer, e), slot) for e, slot in slots.items())
        self.bytes += len(slots) * self._cost(layer)
        self._stats.peak_bytes = max(self._stats.peak_bytes, self.bytes)
        self._stats.bytes_read += len(slots) * self.store.record_bytes(layer)  # counted when issued
        reads = self.store.load(layer, slots, slab, urgent=urgent)
        self._in_flight[id(reads)] = reads
        return reads

    def _land(self, reads: Load, *, waited: bool) -> None:
        """Wait for `reads` and make its experts entries; on a failed read give their room back and raise."""
        start = time.perf_counter()
        layer = reads.layer
        try:
            reads.wait()
        except UserError:
            self._unreserve(reads)
            raise
        finally:
            if waited:
                self._stats.io_seconds += time.perf_counter() - start
            self._in_flight.pop(id(reads), None)
            since = min((r.started for r in self._in_flight.values()), default=None)
            self._busy.add(reads.started, reads.started + reads.seconds, in_flight_since=since)
            self._stats.flash_busy_seconds = self._busy.seconds
        self.store.landed(reads)
        table = self._slot_of[layer]
        for e, slot in reads.slots.items():
            del self._reserved[(layer, e)]
            self._entries[(layer, e)] = slot  # bytes were reserved at submission
            table[e] = slot
        self._slot_arrays.pop(layer, None)

    def _collect(self, layer: int, needed) -> None:
        """Turn this layer's read-aheads that have landed, or that hold an expert in `needed`, into
        entries (waiting for the latter only)."""
        batches = self._pending.get(layer)
        if not batches:
            return
        keep = []
        for reads in batches:
            if not reads.done() and not any(e in reads.slots for e in needed):
                keep.append(reads)
                continue
            start = time.perf_counter()
            try:
                self._land(reads, waited=not reads.done())
            except UserError as e:
                # A read-ahead is a hint: drop the batch and its room; a corrupt record is reported by
                # the acquire that really needs it, to the request that asked for it.
                log.warning("read-ahead of layer %d dropped: %s", layer, e)
            self._stats.prefetch_wait_seconds += time.perf_counter() - start
        if keep:
            self._pending[layer] = keep
        else:
            del self._pending[layer]

    def drain(self) -> None:
        """Finish every read-ahead in flight (before closing the store, or to measure)."""
        for layer in list(self._pending):
            self._collect(layer, self.store.layer(layer).experts)

    def fill(self, layer: int) -> None:
        """When the slab holds every expert (nothing is ever evicted): queue this layer's experts not
        yet resident behind demand reads, once, so that the layer soon is resident for good."""
        if not self._slabs[layer].holds_all or layer in self._filling:
            return
        self._filling.add(layer)
        rest = [e for e in self.store.layer(layer).experts if (layer, e) not in self]
        # one batch per record: an acquire that needs one of them waits for that record only
        self._pending.setdefault(layer, []).extend(self._load(layer, [e], urgent=False) for e in rest)
        self._stats.filled += len(rest)

    def acquire(
        self, layer: int, experts: list[int], *, read_ahead: tuple[int, list[int]] | None = None
    ) -> dict[int, int]:
        """Make `experts` resident (reading misses in parallel) and pin them until release();
        return expert -> its slot in `slab(layer)`. `read_ahead`: (layer, experts) to prefetch once
        these are pinned and their misses queued, before waiting for them, so that the flash goes
        on to the read-aheads the moment the misses are read (the store starts read-aheads only
        while demand reads hold little of the flash)."""
        slab = self._slabs[layer]
        if len(experts) > slab.slots:
            raise ValueError("acquire() asked for more than the budget; use plan_waves()")
        if layer in self._pending and layer not in self._filling:
            self._drop_unneeded(layer, set(experts))
        self._now = self._position.get(layer, 0)
        self._clock /= self.lfu_decay
        if self._clock > 1e100:  # renormalise the decayed counts before floats overflow
            self._freq = {k: v / self._clock for k, v in self._freq.items()}
            self._clock = 1.0
        missing = [e for e in experts if (layer, e) not in self]  # neither resident nor read ahead
        self._pinned.update((layer, e) for e in experts)
        try:
            # The misses go first, ahead of read-aheads not yet started; then this layer's read-aheads
            # land (all that were not taken back, so that what is resident never depends on read
            # timing but through those: the Swift node agrees), then the misses.
            misses = None
            if missing:
                self._make_room(layer, len(missing))
                misses = self._load(layer, missing, urgent=True)
            if read_ahead is not None and read_ahead[0] != layer:
                self.prefetch(*read_ahead)  # evicts nothing pinned: these experts are pinned now
            if layer in self._pending:
                self._collect(layer, experts if layer in self._filling else self.store.layer(layer).experts)
            if misses is not None:
                self._land(misses, waited=True)
            lost = [e for e in experts if (layer, e) not in self._entries]  # a read-ahead that failed
            if lost:
                self._make_room(layer, len(lost))
                self._land(self._load(layer, lost, urgent=True), waited=True)  # raises what is wrong
        except BaseException:
            self.release(layer, experts)  # a failed read (corrupt record) must not leave pins behind
            raise
        read = set(missing) | set(lost)
        self._stats.hits += len(experts) - len(read)
        self._stats.misses += len(read)
        for e in [e for e in experts if e not in read] + missing + lost:  # the order node/cache.py always had
            key = (layer, e)
            if key in self._unused_prefetch:
                self._unused_prefetch.discard(key)
                self._stats.prefetch_used += 1  # a hit (no blocking read) that prefetch paid for
            self._touch(key)
        entries = self._entries
        return {e: entries[(layer, e)] for e in experts}

    def _drop_unneeded(self, layer: int, needed: set[int]) -> None:
        """Take back this layer's read-aheads of experts not in `needed` that have not started: the
        flash reads the misses instead."""
        kept = []
        for reads in self._pending[layer]:
            if needed.isdisjoint(reads.slots) and not reads.done() and reads.drop():
                self._unreserve(reads)
                self._stats.prefetched -= len(reads.slots)
                self._stats.prefetch_dropped += len(reads.slots)
                self._stats.bytes_read -= len(reads.slots) * self.store.record_bytes(layer)  # never read
            else:
                kept.append(reads)
        if kept:
            self._pending[layer] = kept
        else:
            del self._pending[layer]

    def _unreserve(self, reads: Load) -> None:
        """Give back the slots and room of a load that will not become entries."""
        layer, slab = reads.layer, self._slabs[reads.layer]
        self._in_flight.pop(id(reads), None)
        for e, slot in reads.slots.items():
            del self._reserved[(layer, e)]
            slab.give_back(slot)
            self._unused_prefetch.discard((layer, e))
        self.bytes -= len(reads.slots) * self._cost(layer)

    def prefetch(self, layer: int, experts: list[int]) -> list[int]:
        """Start reading `experts` of `layer` (most likely first) that are neither resident nor in
        flight, as many as fit after evicting unpinned entries; return the experts submitted. Does
        not wait."""
        if self._pending.get(layer) and layer not in self._filling:
            self._collect(layer, self.store.layer(layer).experts)  # an earlier read-ahead's rest lands first
        wanted = [e for e in dict.fromkeys(experts) if (layer, e) not in self]
        wanted = wanted[: self._free_room(layer, limit=len(wanted))]
        if not wanted:
            return []
        # A read-ahead evicts what is needed furthest in layer order, whatever the policy: under LRU
        # the oldest entries are those of the very next layers, which a prefetch must not displace.
        self._make_room(layer, len(wanted), policy="cyclic")
        # one load per record, in the order given (most likely first): acquire waits only for those it
        # needs, and takes back those it does not that have not started
        self._pending.setdefault(layer, []).extend(self._load(layer, [e], urgent=False) for e in wanted)
        self._stats.prefetched += len(wanted)
        self._unused_prefetch.update((layer, e) for e in wanted)
        return wanted

    def _free_room(self, layer: int, *, limit: int) -> int:
        """How many of `layer`'s experts could be made room for by evicting unpinned entries."""
        slab = self._slabs[layer]
        evictable = sum(1 for k in self._entries if k not in self._pinned and self._slabs[k[0]] is slab)
        return min(limit, slab.free + evictable)

    def release(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self._pinned.discard((layer, e))

    @property
    def effective_policy(self) -> str:
        return effective_policy(self.policy)

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

    def _make_room(self, layer: int, count: int, *, policy: str | None = None) -> None:
        """Evict until `layer`'s slab has `count` free slots."""
        slab = self._slabs[layer]
        self._evict(slab, count, policy)
        if slab.free < count and self._pending:
            self.drain()  # reads in flight hold reserved slots: land them so they can be evicted
            self._evict(slab, count, policy)
        if slab.free < count:
            raise RuntimeError("expert cache: pinned experts leave no room (a bug in wave planning)")

    def _evict(self, slab: Slab, count: int, policy: str | None) -> None:
        for key in self._victims(policy):
            if slab.free >= count:
                return
            if key in self._pinned or self._slabs[key[0]] is not slab:
                continue
            slab.give_back(self._entries.pop(key))
            self._slot_of[key[0]][key[1]] = -1
            self._slot_arrays.pop(key[0], None)
            self.bytes -= self._cost(key[0])
            self._stats.evictions += 1
            if key in self._unused_prefetch:
                self._unused_prefetch.discard(key)
                self._stats.prefetch_wasted += 1

    def huge_page_bytes(self) -> int:
        """Bytes of the slabs that transparent huge pages back now (node/huge_pages.py; 0 off Linux)."""
        return sum(slab.huge_page_bytes() for slab in {id(s): s for s in self._slabs.values()}.values())

    def close_stats(self) -> CacheStats:
        """Count prefetched experts nobody asked for as wasted; return the statistics."""
        self.drain()
        self._stats.prefetch_wasted += len(self._unused_prefetch)
        self._unused_prefetch.clear()
        return self._stats


def _make_slabs(manifest: Manifest, budget_bytes: int, *, huge_pages: bool) -> dict[int, Slab]:
    """One slab per expert shape, its slots the budget's share (by expert bytes), at most one per expert."""
    groups: dict[tuple, list] = {}
    for spec in manifest.layers:
        groups.setdefault(signature(spec), []).append(spec)
    held = {sig: sum(len(s.experts) for s in specs) for sig, specs in groups.items()}  # a shard holds a subset
    total = sum(held[sig] * specs[0].payload_bytes for sig, specs in groups.items())
    slots = {}
    for sig, specs in groups.items():
        payload = specs[0].payload_bytes
        share = budget_bytes * held[sig] * payload // max(1, total)
        slots[sig] = min(max(manifest.top_k, share // payload), held[sig])
    needed = sum(max(n, manifest.top_k) * groups[sig][0].payload_bytes for sig, n in slots.items())
    if needed > budget_bytes:
        minimum = sum(manifest.top_k * specs[0].payload_bytes for specs in groups.values())
        raise UserError(
            f"RAM budget {format_bytes(budget_bytes)} is below this model's minimum {format_bytes(minimum)} "
            f"(the top-k experts of one layer of each expert shape); pass --ram-budget {minimum} or more"
        )
    slabs = {sig: Slab(specs, slots=slots[sig], huge_pages=huge_pages) for sig, specs in groups.items()}
    return {spec.layer: slabs[sig] for sig, specs in groups.items() for spec in specs}
