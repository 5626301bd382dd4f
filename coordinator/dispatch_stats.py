"""What RemoteExperts (coordinator.remote) counts: per node traffic, per layer call timing, and the
failovers, hedges and recoveries that happened."""

from __future__ import annotations

from dataclasses import dataclass, field

from flashmesh.protos.errors import ErrorKind


@dataclass
class NodeTraffic:
    requests: int = 0
    pairs: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, send -> reply, per request
    failures: int = 0  # requests that failed over to another node
    hedged: int = 0  # requests that were late, so replicas were asked too
    outrun: int = 0  # hedged requests whose replicas answered first (cancelled; the node marked down)


@dataclass(frozen=True)
class LayerCall:
    tokens: int  # N: 1 in decode, the chunk length in prefill
    requests: int  # requests sent, all nodes, hedges and retries included
    wire_bytes: int  # request + reply payload bytes of the replies used
    seconds: float  # split -> all replies in -> reassembled
    rounds: int = 1  # 1, or more when requests failed over to replicas
    hedges: int = 0  # requests sent to replicas because a node was late


@dataclass(frozen=True)
class Failover:
    layer: int
    node: str  # label
    kind: ErrorKind  # one of FAILOVER_KINDS
    reason: str
    pairs: int  # (token, expert) pairs moved to other nodes
    detect_seconds: float  # send -> failure seen (a deadline, or a refused connection)


@dataclass(frozen=True)
class HedgeEvent:
    layer: int
    node: str  # label of the late node
    after_seconds: float  # send -> replicas asked (the node's hedge delay)
    pairs: int  # pairs asked of replicas


@dataclass
class DispatchStats:
    calls: list[LayerCall] = field(default_factory=list)  # one per MoE layer call
    nodes: dict[str, NodeTraffic] = field(default_factory=dict)
    failovers: list[Failover] = field(default_factory=list)
    hedges: list[HedgeEvent] = field(default_factory=list)
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
        """Layer calls that failed over or hedged: their whole duration (detection + the retry)."""
        return [c.seconds for c in self.calls if c.rounds > 1 or c.hedges]

    @property
    def hedge_share(self) -> float:
        """Hedge requests per request answered: the extra RPCs hedging costs."""
        return sum(c.hedges for c in self.calls) / max(1, self.requests)
