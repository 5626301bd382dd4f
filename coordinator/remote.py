"""RemoteExperts: the expert backend that sends each MoE layer's work to the nodes.

Per layer: the (token, expert) pairs are split by placement, each node gets ONE request holding
the hidden states of the tokens that have work on it, plus for each pair its row and expert id;
all requests are in flight at once; the replies are put back into [N, k, D] order. The router
lookahead's prediction of the next layer's experts (`hint`) rides on those requests, so each node
starts reading its share while it computes. No thread of this module touches MLX: encoding and
decoding run on the caller's thread, gRPC only moves bytes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx
import numpy as np

from coordinator.placement import Placement
from node.store_format import StoreError
from protos import flashmesh_pb2 as pb
from protos.codec import CodecError, decode, encode, encode_numpy


class PendingReply(Protocol):
    seconds: float

    def result(self) -> pb.ComputeReply: ...


class NodeLink(Protocol):
    """What RemoteExperts needs of a node: coordinator.client.NodeClient, or InProcessLink in tests."""

    label: str

    def compute_async(self, request: pb.ComputeRequest) -> PendingReply: ...

    def prefetch(self, request: pb.PrefetchRequest) -> pb.PrefetchReply: ...


class InProcessLink:
    """A node object called directly (no network): for tests and single-process experiments."""

    def __init__(self, service, label: str = "in-process") -> None:
        self.service = service
        self.label = label

    def compute_async(self, request: pb.ComputeRequest) -> PendingReply:
        start = time.perf_counter()
        future: Future = Future()
        try:
            future.set_result(self.service.compute(request))
        except Exception as e:  # noqa: BLE001 - handed to the caller through result()
            future.set_exception(e)
        future.seconds = time.perf_counter() - start
        return future

    def prefetch(self, request: pb.PrefetchRequest) -> pb.PrefetchReply:
        return self.service.prefetch(request)


@dataclass
class NodeTraffic:
    requests: int = 0
    pairs: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, send -> reply, per request


@dataclass(frozen=True)
class LayerCall:
    tokens: int  # N: 1 in decode, the chunk length in prefill
    requests: int  # nodes asked
    wire_bytes: int  # request + reply payload bytes, all nodes
    seconds: float  # split -> all replies in -> reassembled


@dataclass
class DispatchStats:
    calls: list[LayerCall] = field(default_factory=list)  # one per MoE layer call
    nodes: dict[str, NodeTraffic] = field(default_factory=dict)

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


class RemoteExperts:
    """ExpertBackend over nodes: one request per node per layer, all nodes in parallel."""

    def __init__(self, links: Mapping[str, NodeLink], placement: Placement) -> None:
        missing = [n for n in placement.node_ids if n not in links]
        if missing:
            raise StoreError(f"placement names nodes without a connection: {missing}")
        self.links = dict(links)
        self.placement = placement
        self._next: tuple[int, np.ndarray] | None = None  # router lookahead: (layer, experts)
        self.stats = DispatchStats(nodes={n: NodeTraffic() for n in placement.node_ids})

    def hint(self, layer: int, experts: list[int]) -> None:
        """The router lookahead's guess at `layer`'s experts; it rides on the next compute's
        requests (each node gets the experts it owns, no extra round trip)."""
        self._next = (layer, np.asarray(experts, dtype=np.int32))

    def _hint_for(self, layer: int, slot: int) -> pb.PrefetchRequest | None:
        if self._next is None or self._next[0] == layer:
            return None
        next_layer, experts = self._next
        mine = experts[self.placement.owner[next_layer][experts] == slot]
        return pb.PrefetchRequest(layer=next_layer, experts=mine.tolist()) if mine.size else None

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, D], indices [N, k] (expert ids) -> per-pair expert outputs [N, k, D]."""
        start = time.perf_counter()
        idx = np.array(indices)  # [N, k]; forces the graph up to the router
        n, k = idx.shape
        flat = idx.reshape(-1).astype(np.int32)  # [N*k]
        slots = self.placement.owner[layer][flat]  # [N*k] primary node of each pair
        in_flight = []
        for slot in np.unique(slots):
            node_id = self.placement.node_ids[int(slot)]
            pairs = np.nonzero(slots == slot)[0]  # [P] flat pair positions
            tokens, rows = np.unique(pairs // k, return_inverse=True)  # [M], [P]
            xs = x if tokens.size == n else x[mx.array(tokens)]  # [M, D]
            request = pb.ComputeRequest(
                layer=layer,
                x=encode(xs),
                rows=encode_numpy(rows.astype(np.int32)),
                experts=encode_numpy(flat[pairs]),
                next=self._hint_for(layer, int(slot)),
            )
            in_flight.append((node_id, pairs, request.ByteSize(), self.links[node_id].compute_async(request)))
        self._next = None
        outputs, order, wire = [], [], 0
        for node_id, pairs, sent, call in in_flight:
            reply = call.result()
            traffic = self.stats.nodes[node_id]
            traffic.requests += 1
            traffic.pairs += pairs.size
            traffic.bytes_sent += sent
            received = reply.ByteSize()
            traffic.bytes_received += received
            traffic.latencies.append(call.seconds)
            wire += sent + received
            try:
                y = decode(reply.y)  # [P, D]
            except CodecError as e:
                raise StoreError(f"node {self.links[node_id].label} sent a malformed reply: {e}") from None
            if y.shape != (pairs.size, x.shape[-1]):
                raise StoreError(
                    f"node {self.links[node_id].label} answered layer {layer} with shape {list(y.shape)}, "
                    f"expected {[pairs.size, x.shape[-1]]}"
                )
            outputs.append(y)
            order.append(pairs)
        y_all = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)  # [N*k, D] in `order`
        out = y_all[mx.array(np.argsort(np.concatenate(order)))].reshape(n, k, -1)  # [N, k, D]
        mx.eval(out)
        self.stats.calls.append(LayerCall(n, len(in_flight), wire, time.perf_counter() - start))
        return out

    def reset_stats(self) -> None:
        self.stats = DispatchStats(nodes={n: NodeTraffic() for n in self.placement.node_ids})

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Ask each owning node to read its share of `experts` into its cache (waits for all)."""
        by_node: dict[str, list[int]] = {}
        for e in sorted(set(experts)):
            by_node.setdefault(self.placement.node_of(layer, e), []).append(e)
        for node_id, mine in by_node.items():
            self.links[node_id].prefetch(pb.PrefetchRequest(layer=layer, experts=mine))

    def close(self) -> None:
        for link in self.links.values():
            close = getattr(link, "close", None)
            if close is not None:
                close()
