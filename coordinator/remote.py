"""RemoteExperts: the expert backend that sends each MoE layer's work to the nodes.

Per layer: the (token, expert) pairs are split by placement, each node gets ONE request holding
the hidden states of the tokens that have work on it, plus for each pair its row and expert id;
all requests are in flight at once; the replies are put back into [N, k, D] order. The router
lookahead's prediction of the next layer's experts (`hint`) rides on those requests, so each node
starts reading its share while it computes. No thread of this module touches MLX: encoding and
decoding run on the caller's thread, gRPC only moves bytes.

Failures (coordinator.failover): every request has a deadline; a node that is unreachable, resets
the connection or misses its deadline is marked down and the pairs it had are re-sent, in the same
layer call, to the next holder of each expert; a damaged record (DATA_LOSS) moves only that
record. Nodes that are down are probed on later layer calls and used again once they answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx
import numpy as np
from flashmesh.coordinator.failover import Deadline, ExpertsLost, Membership, NodeError, format_lost
from flashmesh.coordinator.placement import Placement
from flashmesh.node.cache_stats import CacheStats, ExpertStats
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.codec import CodecError, decode, encode, encode_numpy
from flashmesh.protos.errors import FAILOVER_KINDS, ErrorKind, UserError

log = logging.getLogger(__name__)

DEFAULT_RPC_DEADLINE = 3.0  # seconds: the least time a node gets for a request before it counts as hung
STATS_TIMEOUT = 10.0  # seconds a node gets to answer a Stats call


class PendingReply(Protocol):
    seconds: float

    def done(self) -> bool: ...

    def result(self): ...

    def cancel(self) -> bool: ...


class NodeLink(Protocol):
    """What RemoteExperts needs of a node: coordinator.client.NodeClient, or InProcessLink in tests."""

    label: str

    def compute_async(self, request: pb.ComputeRequest, *, timeout: float | None = None) -> PendingReply: ...

    def info_async(self, *, timeout: float | None = None) -> PendingReply: ...

    def prefetch(self, request: pb.PrefetchRequest, *, timeout: float | None = None) -> pb.PrefetchReply: ...

    def stats(self, *, timeout: float | None = None) -> pb.NodeStats: ...

    def close(self) -> None: ...


@dataclass
class NodeTraffic:
    requests: int = 0
    pairs: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, send -> reply, per request
    failures: int = 0  # requests that failed over to another node


@dataclass(frozen=True)
class LayerCall:
    tokens: int  # N: 1 in decode, the chunk length in prefill
    requests: int  # nodes asked
    wire_bytes: int  # request + reply payload bytes, all nodes
    seconds: float  # split -> all replies in -> reassembled
    rounds: int = 1  # 1, or more when requests failed over to replicas


@dataclass(frozen=True)
class Failover:
    layer: int
    node: str  # label
    kind: ErrorKind  # one of FAILOVER_KINDS
    reason: str
    pairs: int  # (token, expert) pairs moved to other nodes
    detect_seconds: float  # send -> failure seen (a deadline, or a refused connection)


@dataclass
class DispatchStats:
    calls: list[LayerCall] = field(default_factory=list)  # one per MoE layer call
    nodes: dict[str, NodeTraffic] = field(default_factory=dict)
    failovers: list[Failover] = field(default_factory=list)
    recoveries: list[str] = field(default_factory=list)  # labels of nodes that came back

    @property
    def layer_calls(self) -> int:
        return len(self.calls)

    @property
    def layer_seconds(self) -> list[float]:
        return [c.seconds for c in self.calls]

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.nodes.values())

    @property
    def wire_bytes(self) -> int:
        return sum(t.bytes_sent + t.bytes_received for t in self.nodes.values())

    @property
    def stall_seconds(self) -> list[float]:
        """Layer calls that failed over: their whole duration (detection + the retry)."""
        return [c.seconds for c in self.calls if c.rounds > 1]


class RemoteExperts:
    """The ExpertBackend (coordinator.dispatch) over nodes: one request per node per layer, all nodes
    in parallel; failed requests (node gone, hung past its deadline, damaged record) are re-sent to
    replicas."""

    def __init__(
        self,
        links: Mapping[str, NodeLink],
        placement: Placement,
        *,
        rpc_deadline: float = DEFAULT_RPC_DEADLINE,
        probe_deadline: float = 1.0,
        probe_backoff: float = 0.5,
        max_probe_backoff: float = 10.0,
        fingerprint: str | None = None,
    ) -> None:
        missing = [n for n in placement.node_ids if n not in links]
        if missing:
            raise UserError(f"placement names nodes without a connection: {missing}")
        self.links = dict(links)
        self.placement = placement
        self.fingerprint = fingerprint
        self.deadline = Deadline(floor=rpc_deadline)
        self.probe_deadline = probe_deadline
        self.membership = Membership(placement, probe_backoff=probe_backoff, max_probe_backoff=max_probe_backoff)
        self._next: tuple[int, np.ndarray] | None = None  # router lookahead: (layer, experts)
        self.dispatch = DispatchStats(nodes={n: NodeTraffic() for n in placement.node_ids})
        self._node_stats: dict[str, pb.NodeStats] = {}  # each node's last Stats reply

    def hint(self, layer: int, experts: list[int]) -> None:
        """The router lookahead's guess at `layer`'s experts; it rides on the next compute's
        requests (each node gets the experts it owns, no extra round trip)."""
        self._next = (layer, np.asarray(experts, dtype=np.int32))

    def _hint_for(self, layer: int, slot: int) -> pb.PrefetchRequest | None:
        if self._next is None or self._next[0] == layer:
            return None
        next_layer, experts = self._next
        mine = experts[self.membership.route(next_layer, experts) == slot]
        return pb.PrefetchRequest(layer=next_layer, experts=mine.tolist()) if mine.size else None

    # --- health: probes of nodes that are down, polled on the dispatch path ------------------

    def _poll_probes(self, *, wait_for: list[str] | None = None) -> None:
        """Start a probe (Info, short deadline) of each down node whose back-off has elapsed, and
        take the answers of probes that finished. Nothing runs unowned: a probe's future lives in
        the node's state until a later layer call (or close) collects it. `wait_for`: probe those
        nodes now, whatever their back-off, and wait for the answers."""
        now = time.monotonic()
        for node_id in self.membership.down():
            state = self.membership.states[node_id]
            urgent = wait_for is not None and node_id in wait_for
            if state.probe is None and (urgent or now >= state.next_probe):
                state.probe = self.links[node_id].info_async(timeout=self.probe_deadline)
            if state.probe is not None and (urgent or state.probe.done()):
                self._take_probe(node_id)

    def _take_probe(self, node_id: str) -> None:
        state = self.membership.states[node_id]
        probe, state.probe = state.probe, None
        label = self.links[node_id].label
        try:
            info = probe.result()
        except UserError as e:
            self.membership.probe_failed(node_id, str(e))
            return
        if self.fingerprint is not None and info.fingerprint != self.fingerprint:
            self.membership.probe_failed(node_id, f"node {label} now serves another model ({info.fingerprint[:16]})")
            log.warning("node %s answers again but serves another model; not using it", label)
            return
        held = {h.layer: frozenset(h.experts) for h in info.layers}
        self.membership.recovered(node_id, answered_id=info.node_id, held=held)
        self.dispatch.recoveries.append(label)
        log.warning("node %s is back (id %s); routing its experts to it again", label, info.node_id)

    def _fail(self, node_id: str, error: NodeError, layer: int, experts: np.ndarray) -> None:
        """A request to `node_id` failed in a way a replica can stand in for: mark the node down,
        or, for damaged records the request needed, only those records."""
        asked = {(layer, int(e)) for e in experts}
        if error.kind == ErrorKind.DATA_LOSS and asked & set(error.records):
            self.membership.mark_bad(node_id, error.records)
            log.warning("%s; using a replica for those records", error)
        else:
            self.membership.mark_down(node_id, str(error))
            log.warning("%s; marked down, its work goes to the other holders of its experts", error)

    def _lost(self, layer: int, experts: np.ndarray) -> ExpertsLost:
        lost = self.membership.lost()
        needed = sorted({int(e) for e in experts})
        nodes = self.membership.holders(layer, needed)
        why = "; ".join(self.membership.states[n].reason or f"node {self.links[n].label}: damaged records"
                        for n in nodes)  # fmt: skip
        count = sum(len(v) for v in lost.values())
        return ExpertsLost(
            f"{count} experts are lost ({format_lost(lost)}): {why}; no other node holds them. Restart the node "
            "(the coordinator finds it again at the same address) or run shards with replicas "
            "(`flashmesh shard --replicas 2`)",
            lost=lost,
            nodes=[self.links[n].label for n in nodes],
        )

    def _route(self, layer: int, experts: np.ndarray) -> np.ndarray:
        slots = self.membership.route(layer, experts)
        if (slots < 0).any():
            # Last chance before failing the request: ask the nodes that hold the lost experts now.
            gone = experts[slots < 0]
            holders = [n for n in self.membership.holders(layer, np.unique(gone)) if not self.membership.states[n].up]
            self._poll_probes(wait_for=holders)
            slots = self.membership.route(layer, experts)
            if (slots < 0).any():
                raise self._lost(layer, experts[slots < 0])
        return slots

    # --- dispatch ----------------------------------------------------------------------------

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, D], indices [N, k] (expert ids) -> per-pair expert outputs [N, k, D]."""
        start = time.perf_counter()
        self._poll_probes()
        idx = np.array(indices)  # [N, k]; forces the graph up to the router
        n, k = idx.shape
        flat = idx.reshape(-1).astype(np.int32)  # [N*k]
        todo = np.arange(flat.size)  # flat pair positions still to compute
        outputs, order, wire, requests, rounds = [], [], 0, 0, 0
        try:
            while todo.size:
                rounds += 1
                in_flight = self._send(layer, x, flat, todo, k)
                requests += len(in_flight)
                failed = []
                for node_id, pairs, sent, call in in_flight:
                    try:
                        reply = call.result()
                    except NodeError as e:
                        if e.kind not in FAILOVER_KINDS:
                            raise
                        self._fail(node_id, e, layer, flat[pairs])
                        label = self.links[node_id].label
                        self.dispatch.failovers.append(Failover(layer, label, e.kind, str(e), pairs.size, call.seconds))
                        self.dispatch.nodes[node_id].failures += 1
                        failed.append(pairs)
                        continue
                    wire += sent + reply.ByteSize()
                    outputs.append(self._decode(node_id, reply, layer, pairs, sent, call.seconds, x.shape[-1]))
                    order.append(pairs)
                todo = np.concatenate(failed) if failed else todo[:0]
        finally:
            self._next = None
        y_all = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)  # [N*k, D] in `order`
        out = y_all[mx.array(np.argsort(np.concatenate(order)))].reshape(n, k, -1)  # [N, k, D]
        mx.eval(out)
        self.dispatch.calls.append(LayerCall(n, requests, wire, time.perf_counter() - start, rounds))
        return out

    def _send(self, layer: int, x: mx.array, flat: np.ndarray, todo: np.ndarray, k: int) -> list:
        """One request per node for the pairs `todo` (flat positions), all in flight at once."""
        slots = self._route(layer, flat[todo])  # [T] node computing each pair
        n = x.shape[0]
        in_flight = []
        for slot in np.unique(slots):
            node_id = self.placement.node_ids[int(slot)]
            pairs = todo[slots == slot]  # [P] flat pair positions
            tokens, rows = np.unique(pairs // k, return_inverse=True)  # [M], [P]
            xs = x if tokens.size == n else x[mx.array(tokens)]  # [M, D]
            request = pb.ComputeRequest(
                layer=layer,
                x=encode(xs),
                rows=encode_numpy(rows.astype(np.int32)),
                experts=encode_numpy(flat[pairs]),
                next=self._hint_for(layer, int(slot)),
            )
            call = self.links[node_id].compute_async(request, timeout=self.deadline.seconds(pairs.size))
            in_flight.append((node_id, pairs, request.ByteSize(), call))
        self._next = None  # hints ride on the first round only
        return in_flight

    def _decode(self, node_id, reply, layer: int, pairs: np.ndarray, sent: int, seconds: float, d: int) -> mx.array:
        traffic = self.dispatch.nodes[node_id]
        traffic.requests += 1
        traffic.pairs += pairs.size
        traffic.bytes_sent += sent
        traffic.bytes_received += reply.ByteSize()
        traffic.latencies.append(seconds)
        self.deadline.observe(seconds, pairs.size)
        label = self.links[node_id].label
        try:
            y = decode(reply.y)  # [P, D]
        except CodecError as e:
            raise UserError(f"node {label} sent a malformed reply: {e}") from None
        if y.shape != (pairs.size, d):
            raise UserError(
                f"node {label} answered layer {layer} with shape {list(y.shape)}, expected {[pairs.size, d]}"
            )
        return y

    def reset_dispatch(self) -> None:
        """Start the wire figures afresh (a server does after each request, or its lists would grow)."""
        self.dispatch = DispatchStats(nodes={n: NodeTraffic() for n in self.placement.node_ids})

    def stats(self) -> ExpertStats:
        """Each node's cache counters (its Stats RPC); a node that is down or does not answer keeps
        the figures it last reported, so a window over a failover still adds up."""
        for node_id, link in self.links.items():
            if not self.membership.states[node_id].up and node_id in self._node_stats:
                continue
            try:
                self._node_stats[node_id] = link.stats(timeout=STATS_TIMEOUT)
            except UserError as e:
                log.warning("no statistics from %s: %s", link.label, e)
                self._node_stats.setdefault(node_id, pb.NodeStats())
        return ExpertStats(
            {n: CacheStats.from_proto(s) for n, s in self._node_stats.items()},
            {n: s.ram_budget_bytes for n, s in self._node_stats.items()},
        )

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Ask each node computing `experts` now to read its share into its cache (waits for all).
        A hint: a node that fails it is marked down (its work moves on), nothing is raised."""
        wanted = np.asarray(sorted(set(experts)), dtype=np.int32)
        slots = self.membership.route(layer, wanted)
        for slot in np.unique(slots[slots >= 0]):
            node_id = self.placement.node_ids[int(slot)]
            mine = wanted[slots == slot]
            request = pb.PrefetchRequest(layer=layer, experts=mine.tolist())
            try:
                self.links[node_id].prefetch(request, timeout=self.deadline.seconds(mine.size))
            except NodeError as e:
                if e.kind not in FAILOVER_KINDS:
                    raise
                self._fail(node_id, e, layer, mine)

    def close(self) -> None:
        for state in self.membership.states.values():
            if state.probe is not None:
                state.probe.cancel()
            state.probe = None
        for link in self.links.values():
            link.close()
