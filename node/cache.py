"""ExpertCache: the node's RAM cache of expert weights under a hard byte budget.

Entries are whole experts (all tensors of one record) as MLX arrays. The experts one batched call
needs are pinned while it runs; everything else is evictable (LRU). The cache never holds more
than `budget_bytes` of expert weights: a request larger than the budget is split into waves by
`plan_waves`, each of which fits.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from node.store_format import StoreError
from node.store_reader import ExpertStore

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

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / self.io_seconds / 1e9 if self.io_seconds else 0.0


class ExpertCache:
    def __init__(self, store: ExpertStore, *, budget_bytes: int) -> None:
        minimum = store.manifest.min_budget_bytes
        if budget_bytes < minimum:
            raise StoreError(
                f"RAM budget {format_bytes(budget_bytes)} is below this model's minimum "
                f"{format_bytes(minimum)} (the top-k experts of one layer); pass --ram-budget {minimum} or more"
            )
        self.store = store
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Key, dict[str, mx.array]] = OrderedDict()
        self._pinned: set[Key] = set()
        self.bytes = 0
        self.stats = CacheStats()

    def _cost(self, layer: int) -> int:
        return self.store.layer(layer).payload_bytes

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def plan_waves(self, layer: int, experts: list[int]) -> list[list[int]]:
        """Split `experts` into groups that each fit the budget; resident experts go first."""
        capacity = max(1, self.budget_bytes // self._cost(layer))
        ordered = sorted(experts, key=lambda e: (layer, e) not in self._entries)
        return [ordered[i : i + capacity] for i in range(0, len(ordered), capacity)]

    def acquire(self, layer: int, experts: list[int]) -> dict[int, dict[str, mx.array]]:
        """Make `experts` resident (reading misses in parallel) and pin them until release()."""
        cost = self._cost(layer)
        if len(experts) * cost > self.budget_bytes:
            raise ValueError("acquire() asked for more than the budget; use plan_waves()")
        missing = [e for e in experts if (layer, e) not in self._entries]
        hits = len(experts) - len(missing)
        self.stats.hits += hits
        self.stats.misses += len(missing)
        for e in experts:
            if (layer, e) in self._entries:
                self._entries.move_to_end((layer, e))
            self._pinned.add((layer, e))
        if missing:
            self._make_room(len(missing) * cost)
            before = self.store.stats.bytes, self.store.stats.seconds
            fetched = self.store.read(layer, missing)
            self.stats.bytes_read += self.store.stats.bytes - before[0]
            self.stats.io_seconds += self.store.stats.seconds - before[1]
            for e, arrays in fetched.items():
                self._entries[(layer, e)] = arrays
                self.bytes += cost
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.bytes)
        return {e: self._entries[(layer, e)] for e in experts}

    def release(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self._pinned.discard((layer, e))

    def _make_room(self, needed: int) -> None:
        for key in list(self._entries):
            if self.bytes + needed <= self.budget_bytes:
                return
            if key in self._pinned:
                continue
            del self._entries[key]
            self.bytes -= self._cost(key[0])
            self.stats.evictions += 1
        if self.bytes + needed > self.budget_bytes:
            raise RuntimeError("expert cache: pinned experts leave no room (a bug in wave planning)")


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
