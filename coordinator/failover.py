"""Failover, transport-free: which node computes each (layer, expert) while nodes fail and return,
how long to wait for a node, and the errors a node call ends in.

`Membership` keeps, per MoE layer, each expert's candidates (the placement's primary, then its
replicas, best first) and per node whether it is up and which of its records are damaged. `route`
picks the first usable candidate of each expert; an expert with none is lost, and `ExpertsLost`
names them. `Deadline` turns measured latencies into a per-request deadline, the last resort;
`Hedge` says when a request is late against its node's own recent latency, so that a replica gets
the same pairs long before the deadline. RemoteExperts (coordinator.remote) drives them; tests
drive them with in-process links, no network.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flashmesh.coordinator.placement import Placement
from flashmesh.protos.errors import ErrorKind, UserError

Key = tuple[int, int]  # (layer, expert)


class NodeError(UserError):
    """A node could not be used: unreachable, refused the token, wrong model, failed a request.
    `kind` says which (protos.errors: FAILOVER_KINDS a replica can stand in for); `records` the
    (layer, expert) records it found damaged."""

    def __init__(self, message: str, *, kind: ErrorKind = ErrorKind.UNKNOWN, records: Iterable[Key] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.records = tuple(records)


class ExpertsLost(UserError):
    """Experts a request needs that no reachable node can compute; names them and the nodes down."""

    def __init__(self, message: str, *, lost: dict[int, list[int]], nodes: list[str]) -> None:
        super().__init__(message)
        self.lost = lost
        self.nodes = nodes


def format_ranges(values: Iterable[int], *, limit: int = 12) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (at most `limit` runs, then "...")."""
    runs: list[list[int]] = []
    for v in sorted(set(int(v) for v in values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    return ", ".join(text) + (", ..." if len(runs) > limit else "")


def format_lost(lost: dict[int, list[int]], *, layers: int = 3) -> str:
    """{layer: experts} -> "layer 0 experts 1, 4-6; layer 1 experts 2 (and 5 more layers)"."""
    shown = [f"layer {layer} experts {format_ranges(experts)}" for layer, experts in sorted(lost.items())[:layers]]
    more = len(lost) - layers
    return "; ".join(shown) + (f" (and {more} more layers)" if more > 0 else "")


class Deadline:
    """Seconds a Compute request may take before its node counts as hung.

    Until `warmup` replies have been measured (cold caches, first prefill) it is `initial`. Then it
    is `factor` x the slowest recent seconds-per-pair x the request's pairs, never below `floor`:
    a decode request gets the floor, a large prefill chunk proportionally more. The per-pair figure
    charges the fixed round trip to every pair, so it errs long for big requests, never short."""

    def __init__(
        self, *, floor: float, initial: float | None = None, factor: float = 10.0, window: int = 256, warmup: int = 8
    ) -> None:
        if floor <= 0:
            raise UserError(f"an RPC deadline must be positive, got {floor:g} s")
        self.floor = floor
        self.initial = max(floor, initial if initial is not None else 10 * floor)
        self.factor = factor
        self.warmup = warmup
        self._per_pair: deque[float] = deque(maxlen=window)

    def observe(self, seconds: float, pairs: int) -> None:
        self._per_pair.append(seconds / max(1, pairs))

    def seconds(self, pairs: int) -> float:
        if len(self._per_pair) < self.warmup:
            return self.initial
        return max(self.floor, self.factor * max(self._per_pair) * max(1, pairs))


class Hedge:
    """When a request is late enough that a replica should get the same pairs too (first answer wins).

    Late means unanswered after `factor` x the node's own recent p99 latency for requests of that
    size (pairs rounded up to a power of two), and never sooner than `floor` seconds. A size class
    with fewer than `warmup` measured replies borrows the nearest smaller warm one, scaled by the
    pairs, else the nearest larger one as it is; a node with none is not hedged (its deadline
    still applies)."""

    def __init__(
        self,
        *,
        factor: float = 3.0,
        floor: float = 0.05,
        quantile: float = 99.0,
        window: int = 128,
        warmup: int = 16,
        enabled: bool = True,
    ) -> None:
        if factor <= 0 or floor < 0:
            raise UserError(f"a hedge needs a positive factor and a floor >= 0, got {factor:g} and {floor:g} s")
        self.factor, self.floor, self.quantile, self.window, self.warmup = factor, floor, quantile, window, warmup
        self.enabled = enabled  # False: never hedge, only deadlines (for comparison)
        self._seconds: dict[tuple[str, int], deque[float]] = {}
        self._p99: dict[tuple[str, int], float] = {}  # cached quantile, refreshed every 8 replies

    @staticmethod
    def _size_class(pairs: int) -> int:
        return (max(1, pairs) - 1).bit_length()  # 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ...

    def observe(self, node: str, seconds: float, pairs: int) -> None:
        key = (node, self._size_class(pairs))
        window = self._seconds.setdefault(key, deque(maxlen=self.window))
        window.append(seconds)
        if len(window) >= self.warmup and (key not in self._p99 or len(window) % 8 == 0):
            self._p99[key] = float(np.percentile(window, self.quantile))

    def after(self, node: str, pairs: int) -> float | None:
        """Seconds to wait for `node`'s answer to a request of `pairs` before hedging; None: never."""
        if not self.enabled:
            return None
        size = self._size_class(pairs)
        for warm in range(size, -1, -1):
            p99 = self._p99.get((node, warm))
            if p99 is not None:
                return max(self.floor, self.factor * p99 * 2 ** (size - warm))
        larger = [c for n, c in self._p99 if n == node and c > size]
        if larger:  # a bigger request's latency bounds a smaller one's
            return max(self.floor, self.factor * self._p99[(node, min(larger))])
        return None


@dataclass
class NodeState:
    up: bool = True
    reason: str = ""  # why it is down (one line)
    down_since: float = 0.0
    next_probe: float = 0.0
    backoff: float = 0.0
    node_id: str = ""  # the id the node answered with last (a restarted node answers with a new one)
    bad: set[Key] = field(default_factory=set)  # records damaged on this node's flash
    bad_retry: dict[Key, tuple[float, float]] = field(default_factory=dict)  # record -> (retry at, back-off)
    probe: object | None = None  # a probe in flight (PendingReply of an Info call)


class Membership:
    """Which nodes are usable, and for each (layer, expert) the first usable one of its holders."""

    def __init__(
        self,
        placement: Placement,
        *,
        probe_backoff: float = 0.5,
        max_probe_backoff: float = 10.0,
        record_retry: float = 5.0,
        max_record_retry: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """A damaged record is tried again after `record_retry` seconds (a read error may pass, a
        re-copied file heals), doubling each time it fails again, up to `max_record_retry`."""
        self.placement = placement
        self.record_retry, self.max_record_retry = record_retry, max_record_retry
        self.node_ids = list(placement.node_ids)
        self.probe_backoff = probe_backoff
        self.max_probe_backoff = max_probe_backoff
        self.clock = clock
        self.states = {n: NodeState(node_id=n) for n in self.node_ids}
        slot = {n: i for i, n in enumerate(self.node_ids)}
        width = 1 + max((len(r) for r in placement.replicas.values()), default=0)
        # layer -> [E, C] candidate slots per expert: primary, then replicas best first; -1 pads
        self.choices: dict[int, np.ndarray] = {}
        for layer, owner in placement.owner.items():
            choices = np.full((owner.size, width), -1, dtype=np.int32)
            choices[:, 0] = owner
            self.choices[layer] = choices
        for (layer, expert), alternatives in placement.replicas.items():
            self.choices[layer][expert, 1 : 1 + len(alternatives)] = [slot[n] for n in alternatives]
        self._up = np.ones(len(self.node_ids), dtype=bool)
        self._suspect = np.zeros(len(self.node_ids), dtype=bool)  # down only for being slow once
        self._bad = {layer: np.zeros((c.shape[0], len(self.node_ids)), dtype=bool) for layer, c in self.choices.items()}
        self.healthy = True  # every node up and no record damaged: routing is the placement's

    # --- routing -----------------------------------------------------------------------------

    def _usable(
        self, layer: int, experts: np.ndarray, avoid: Iterable[int] = (), suspects: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        choices = self.choices[layer][experts]  # [P, C]
        safe = choices.clip(0)
        up = self._up | self._suspect if suspects else self._up.copy()
        up[list(avoid)] = False
        ok = (choices >= 0) & up[safe] & ~self._bad[layer][experts[:, None], safe]  # [P, C]
        return choices, ok

    def route(
        self, layer: int, experts: np.ndarray, *, avoid: Iterable[int] = (), suspects: bool = False
    ) -> np.ndarray:
        """experts [P] -> node slot [P] computing each; -1 where no usable node holds it. `avoid`:
        node slots not to use (a hedge goes to another holder than the late node); `suspects`:
        count nodes that are down only for having been slow (outrun by a hedge) as usable."""
        avoid = tuple(avoid)
        if self.healthy and not avoid:
            return self.placement.owner[layer][experts]
        choices, ok = self._usable(layer, experts, avoid, suspects)
        slots = choices[np.arange(experts.size), ok.argmax(axis=1)]
        return np.where(ok.any(axis=1), slots, -1).astype(np.int32)

    def lost(self, layers: Iterable[int] | None = None) -> dict[int, list[int]]:
        """Every expert (of `layers`, default all) no usable node holds."""
        out = {}
        for layer in self.choices if layers is None else layers:
            experts = np.arange(self.choices[layer].shape[0])
            _, ok = self._usable(layer, experts)
            gone = np.nonzero(~ok.any(axis=1))[0]
            if gone.size:
                out[layer] = gone.tolist()
        return out

    def holders(self, layer: int, experts: Iterable[int]) -> list[str]:
        """Nodes (ids) holding any of `experts` of `layer` in the placement."""
        slots = {int(s) for e in experts for s in self.choices[layer][e] if s >= 0}
        return [self.node_ids[s] for s in sorted(slots)]

    # --- state changes -----------------------------------------------------------------------

    def _refresh(self) -> None:
        self.healthy = bool(self._up.all()) and not any(b.any() for b in self._bad.values())

    def mark_down(self, node_id: str, reason: str, *, slow: bool = False) -> None:
        """`slow`: it only answered later than its replicas did (a hedge may still use it)."""
        state = self.states[node_id]
        now = self.clock()
        if state.up:
            state.up, state.down_since, state.backoff = False, now, self.probe_backoff
            state.next_probe = now + state.backoff
        state.reason = reason
        slot = self.node_ids.index(node_id)
        self._suspect[slot] = slow and (self._suspect[slot] or self._up[slot])
        self._up[slot] = False
        self._refresh()

    def mark_bad(self, node_id: str, records: Iterable[Key], *, retry: bool = True) -> int:
        """Records damaged on `node_id`'s flash (or, `retry` False, no longer held there): route them
        elsewhere. Returns how many were new."""
        state, slot, new, now = self.states[node_id], self.node_ids.index(node_id), 0, self.clock()
        for layer, expert in records:
            if layer in self._bad and 0 <= expert < self._bad[layer].shape[0] and (layer, expert) not in state.bad:
                state.bad.add((layer, expert))
                self._bad[layer][expert, slot] = True
                _, last = state.bad_retry.get((layer, expert), (0.0, self.record_retry / 2))
                backoff = min(self.max_record_retry, 2 * last) if retry else float("inf")
                state.bad_retry[(layer, expert)] = (now + backoff, backoff)
                new += 1
        self._refresh()
        return new

    def retry_records(self) -> int:
        """Let damaged records whose back-off has passed be tried again; returns how many."""
        now, count = self.clock(), 0
        for node_id, state in self.states.items():
            due = [key for key in state.bad if state.bad_retry.get(key, (0.0,))[0] <= now]
            for layer, expert in due:
                state.bad.discard((layer, expert))
                self._bad[layer][expert, self.node_ids.index(node_id)] = False
            count += len(due)
        if count:
            self._refresh()
        return count

    def probe_failed(self, node_id: str, reason: str) -> None:
        state = self.states[node_id]
        state.reason = reason
        state.backoff = min(self.max_probe_backoff, max(state.backoff, self.probe_backoff) * 2)
        state.next_probe = self.clock() + state.backoff

    def recovered(self, node_id: str, *, answered_id: str, held: dict[int, frozenset[int]]) -> None:
        """The node answers again. A restart (new id) forgets its damaged records; experts it no
        longer holds stay routed elsewhere."""
        state, slot = self.states[node_id], self.node_ids.index(node_id)
        if answered_id != state.node_id:
            for layer, expert in state.bad:
                self._bad[layer][expert, slot] = False
            state.bad.clear()
            state.bad_retry.clear()
            state.node_id = answered_id
        missing = [
            (layer, int(e))
            for layer, choices in self.choices.items()
            for e in np.nonzero((choices == slot).any(axis=1))[0]
            if int(e) not in held.get(layer, ())
        ]
        self.mark_bad(node_id, missing, retry=False)
        state.up, state.reason, state.probe = True, "", None
        self._up[slot], self._suspect[slot] = True, False
        self._refresh()

    def down(self) -> list[str]:
        return [n for n in self.node_ids if not self.states[n].up]
