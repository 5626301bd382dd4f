"""RemoteExperts: the expert backend that sends each MoE layer's work to the nodes.

Per layer: the (token, expert) pairs are split by placement, each node gets ONE request holding
the hidden states of the tokens that have work on it, plus for each pair its row and expert id;
all requests are in flight at once; the replies are put back into [N, k, D] order. The router
lookahead's prediction of the next layer's experts (`hint`) rides on those requests, so each node
starts reading its share while it computes. No thread of this module touches MLX: encoding and
decoding run on the caller's thread, gRPC only moves bytes.

Failures (coordinator.failover): a request still unanswered after a multiple of its node's own
recent p99 latency is hedged: the pairs it holds go to the next holder of each expert as well, the
first answer wins and the other request is cancelled; a node whose replicas won is marked down.
Every request also has a deadline, the last resort where no replica exists. A node that is
unreachable, resets the connection or misses its deadline is marked down and its pairs re-sent, in
the same layer call, to the next holder of each expert; a damaged record (DATA_LOSS) moves only
that record. Nodes that are down are probed on later layer calls (at a new address, when
discovery saw them move) and used again once they answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from flashmesh.coordinator.dispatch_stats import DispatchStats, Failover, HedgeEvent, LayerCall, NodeTraffic
from flashmesh.coordinator.failover import Deadline, Hedge, Membership, NodeError
from flashmesh.coordinator.links import NodeLink, PendingReply, Relink
from flashmesh.coordinator.node_health import NodeHealth
from flashmesh.coordinator.placement import Placement
from flashmesh.node.cache_stats import CacheStats, ExpertStats
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.codec import CodecError, decode, encode, encode_numpy
from flashmesh.protos.errors import FAILOVER_KINDS, UserError

log = logging.getLogger(__name__)

DEFAULT_RPC_DEADLINE = 3.0  # seconds: the least time a node gets for a request before it counts as hung
STATS_TIMEOUT = 10.0  # seconds a node gets to answer a Stats call


@dataclass(eq=False)
class _Attempt:
    """One request of a layer call in flight: which node, which flat pair positions."""

    node_id: str
    slot: int
    pairs: np.ndarray  # [P] flat pair positions
    sent: int  # request bytes
    call: PendingReply
    sent_at: float
    hedge_at: float | None  # perf_counter time at which replicas get these pairs too; None: never
    is_hedge: bool = False


class RemoteExperts:
    """ExpertBackend over nodes: one request per node per layer, all nodes in parallel; late
    requests are hedged to replicas, failed ones (node gone, hung past its deadline, damaged
    record) re-sent to them."""

    def __init__(
        self,
        links: Mapping[str, NodeLink],
        placement: Placement,
        *,
        rpc_deadline: float = DEFAULT_RPC_DEADLINE,
        hedge: Hedge | None = None,
        probe_deadline: float = 1.0,
        probe_backoff: float = 0.5,
        max_probe_backoff: float = 2.0,
        fingerprint: str | None = None,
        relink: Relink | None = None,
    ) -> None:
        """`hedge`: when to ask a replica too (None: Hedge()'s defaults; Hedge(enabled=False): never).
        `relink(node_id)`: a link to the node at a new address when discovery saw it move (else None);
        closed with this backend."""
        missing = [n for n in placement.node_ids if n not in links]
        if missing:
            raise UserError(f"placement names nodes without a connection: {missing}")
        self.links = dict(links)
        self.placement = placement
        self.fingerprint = fingerprint
        self.relink = relink
        self.deadline = Deadline(floor=rpc_deadline)
        self.hedge = Hedge() if hedge is None else hedge
        self.membership = Membership(placement, probe_backoff=probe_backoff, max_probe_backoff=max_probe_backoff)
        self.health = NodeHealth(
            self.links, self.membership, fingerprint=fingerprint, relink=relink, probe_deadline=probe_deadline,
            on_recovered=lambda label: self.dispatch.recoveries.append(label),
        )  # fmt: skip
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

    def poll_health(self) -> None:
        """Probe nodes that are down now, between requests (an idle server takes them back too)."""
        self.health.poll()

    # --- dispatch ----------------------------------------------------------------------------

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] (expert ids) -> per-pair expert outputs [..., k, D]."""
        start = time.perf_counter()
        self.health.poll()
        lead = indices.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [N, D]
        idx = np.array(indices).reshape(-1, indices.shape[-1])  # [N, k]; forces the graph up to the router
        n, k = idx.shape
        flat = idx.reshape(-1).astype(np.int32)  # [N*k]
        wake = threading.Event()  # set (on a gRPC thread) when any reply of this call is in
        done = np.zeros(flat.size, dtype=bool)  # flat pair positions answered
        outputs, order = [], []  # [P_i, D] pieces and the flat positions they hold
        pending: list[_Attempt] = []
        wire, sent, rounds, hedges = 0, 0, 1, 0
        try:
            pending = self._send(layer, x, flat, np.arange(flat.size), k, wake)
            sent = len(pending)
            while not done.all():
                wake.clear()  # before looking, so that a reply landing now still wakes the wait below
                for a in [a for a in pending if a.call.done()]:
                    pending.remove(a)
                    reply = self._reply(a, layer, flat)
                    if reply is None:  # failed over: re-send what no other request is computing
                        covered = np.zeros(flat.size, dtype=bool)
                        for other in pending:
                            covered[other.pairs] = True
                        orphans = a.pairs[~done[a.pairs] & ~covered[a.pairs]]
                        if orphans.size:
                            more = self._send(layer, x, flat, orphans, k, wake)
                            pending += more
                            sent, rounds = sent + len(more), rounds + 1
                        continue
                    y = self._decode(a, reply, layer, x.shape[-1])  # [P, D]
                    fresh = ~done[a.pairs]
                    if fresh.any():
                        outputs.append(y if fresh.all() else y[mx.array(np.nonzero(fresh)[0])])
                        order.append(a.pairs[fresh])
                        done[a.pairs] = True
                        wire += a.sent + reply.ByteSize()
                for a in [a for a in pending if done[a.pairs].all()]:  # lost the race: cancel
                    pending.remove(a)
                    a.call.cancel()
                    self._lost_race(a, layer)
                now = time.perf_counter()
                for a in [a for a in pending if a.hedge_at is not None and now >= a.hedge_at]:
                    a.hedge_at = None
                    more = self._hedge(layer, x, flat, a, done, k, wake)
                    pending += more
                    sent, hedges = sent + len(more), hedges + len(more)
                if not done.all():
                    wake.wait(self._wait_seconds(pending))
        finally:
            self._next = None
            for a in pending:  # an error ends the call: nothing of it stays in flight
                a.call.cancel()
        y_all = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)  # [N*k, D] in `order`
        out = y_all[mx.array(np.argsort(np.concatenate(order)))].reshape(*lead, k, -1)  # [..., k, D]
        mx.eval(out)
        self.dispatch.calls.append(LayerCall(n, sent, wire, time.perf_counter() - start, rounds, hedges))
        return out

    @staticmethod
    def _wait_seconds(pending: list[_Attempt]) -> float:
        """Until the next hedge is due (at most 0.5 s: replies wake the wait sooner)."""
        due = [a.hedge_at for a in pending if a.hedge_at is not None]
        return max(0.0, min([*due, time.perf_counter() + 0.5]) - time.perf_counter())

    def _reply(self, a: _Attempt, layer: int, flat: np.ndarray):
        """The reply of a finished request, or None when it failed in a way replicas stand in for."""
        try:
            return a.call.result()
        except NodeError as e:
            if e.kind not in FAILOVER_KINDS:
                raise
            self.health.fail(a.node_id, e, layer, flat[a.pairs])
            label = self.links[a.node_id].label
            self.dispatch.failovers.append(Failover(layer, label, e.kind, str(e), a.pairs.size, a.call.seconds))
            self.dispatch.nodes[a.node_id].failures += 1
            return None

    def _hedge(self, layer, x: mx.array, flat: np.ndarray, a: _Attempt, done: np.ndarray, k: int, wake) -> list:
        """`a` is late: send its unanswered pairs to the next holder of each expert as well."""
        want = a.pairs[~done[a.pairs]]
        slots = self.membership.route(layer, flat[want], avoid=(a.slot,))  # [W]
        if (slots < 0).any():  # the other holder is down only for having been slow once: better than waiting
            slots = np.where(slots < 0, self.membership.route(layer, flat[want], avoid=(a.slot,), suspects=True), slots)
        ok = slots >= 0
        if not ok.any():
            return []  # no replica: the request's deadline is the last resort
        label, waited = self.links[a.node_id].label, time.perf_counter() - a.sent_at
        self.dispatch.nodes[a.node_id].hedged += 1
        self.dispatch.hedges.append(HedgeEvent(layer, label, waited, int(ok.sum())))
        log.info("node %s is late on layer %d (%.0f ms); asking replicas too", label, layer, waited * 1e3)
        return self._send_slots(layer, x, flat, want[ok], slots[ok], k, wake, hedge=True)

    def _lost_race(self, a: _Attempt, layer: int) -> None:
        """`a` was cancelled because other requests answered all its pairs first."""
        if a.is_hedge:
            return
        label, waited = self.links[a.node_id].label, time.perf_counter() - a.sent_at
        self.dispatch.nodes[a.node_id].outrun += 1
        reason = f"node {label}: no answer within {waited * 1e3:.0f} ms (hedged to replicas, which answered)"
        self.membership.mark_down(a.node_id, reason, slow=True)
        log.warning("%s; marked down until a probe answers", reason)

    def _send(self, layer: int, x: mx.array, flat: np.ndarray, todo: np.ndarray, k: int, wake) -> list:
        """One request per node for the pairs `todo` (flat positions), all in flight at once."""
        return self._send_slots(layer, x, flat, todo, self.health.route(layer, flat[todo]), k, wake)

    def _send_slots(self, layer, x, flat, todo: np.ndarray, slots: np.ndarray, k: int, wake, *, hedge=False) -> list:
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
                next=None if hedge else self._hint_for(layer, int(slot)),
            )
            sent_at = time.perf_counter()
            call = self.links[node_id].compute_async(request, timeout=self.deadline.seconds(pairs.size))
            call.add_done_callback(lambda _reply: wake.set())
            delay = None if hedge else self.hedge.after(node_id, pairs.size)
            hedge_at = None if delay is None else sent_at + delay
            in_flight.append(_Attempt(node_id, int(slot), pairs, request.ByteSize(), call, sent_at, hedge_at, hedge))
        self._next = None  # hints ride on the first round only
        return in_flight

    def _decode(self, a: _Attempt, reply, layer: int, d: int) -> mx.array:
        traffic, seconds = self.dispatch.nodes[a.node_id], a.call.seconds
        traffic.requests += 1
        traffic.pairs += a.pairs.size
        traffic.bytes_sent += a.sent
        traffic.bytes_received += reply.ByteSize()
        traffic.latencies.append(seconds)
        self.deadline.observe(seconds, a.pairs.size)
        self.hedge.observe(a.node_id, seconds, a.pairs.size)
        label = self.links[a.node_id].label
        try:
            y = decode(reply.y)  # [P, D]
        except CodecError as e:
            raise UserError(f"node {label} sent a malformed reply: {e}") from None
        if y.shape != (a.pairs.size, d):
            raise UserError(
                f"node {label} answered layer {layer} with shape {list(y.shape)}, expected {[a.pairs.size, d]}"
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
                self.health.fail(node_id, e, layer, mine)

    def close(self) -> None:
        for state in self.membership.states.values():
            if state.probe is not None:
                state.probe.cancel()
            state.probe = None
        if self.relink is not None:
            self.relink.close()
        for link in self.links.values():
            link.close()
