"""The coordinator's gRPC adapter to one node. Every call carries the cluster token; every failure
becomes a `NodeError` (a UserError: one line naming the node and why) whose `kind` tells the
failover (coordinator.failover) whether a replica can stand in."""

from __future__ import annotations

import time

import grpc
from flashmesh.coordinator.discovery import NodeAddress
from flashmesh.coordinator.failover import NodeError
from flashmesh.node.tls import TlsIdentity, handshake_hint
from flashmesh.protos import DEFAULT_MAX_MESSAGE_BYTES, LOST_RECORDS_METADATA_KEY, TOKEN_METADATA_KEY
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos import flashmesh_pb2_grpc as pb_grpc
from flashmesh.protos.codec import parse_records
from flashmesh.protos.errors import ErrorKind

# A connection cut mid-call (node killed) can surface as UNKNOWN / INTERNAL / CANCELLED with these words.
_CUT = ("stream removed", "socket closed", "connection reset", "broken pipe", "goaway", "channel closed")
# Reconnect soon after a node comes back (gRPC's default back-off grows to 120 s).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
# A link that drops loses packets silently: ping every 2 s and drop a connection unanswered for 1 s,
# so that it reconnects within seconds of the link coming back instead of TCP's growing retransmit
# timer (the node allows these pings: node.server.KEEPALIVE_SERVER_OPTIONS).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def _error(e: grpc.RpcError, label: str, timeout: float, *, tls: bool = False) -> NodeError:
    kind = ErrorKind.__members__.get(e.code().name, ErrorKind.UNKNOWN)  # gRPC status -> the same-named kind
    if kind in (ErrorKind.UNKNOWN, ErrorKind.INTERNAL) and any(w in (e.details() or "").lower() for w in _CUT):
        kind = ErrorKind.UNAVAILABLE
    records: tuple = ()
    if kind == ErrorKind.DATA_LOSS:
        for key, value in e.trailing_metadata() or ():
            if key == LOST_RECORDS_METADATA_KEY:
                records = parse_records(value)
    return NodeError(f"node {label}: {_why(e, timeout, tls=tls)}", kind=kind, records=records)


def _why(e: grpc.RpcError, timeout: float, *, tls: bool = False) -> str:
    code, details = e.code(), (e.details() or "").splitlines()[0] if e.details() else ""
    if code == grpc.StatusCode.UNAVAILABLE and (hint := handshake_hint(details, tls=tls)):
        return hint
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"unreachable ({details or 'connection refused'}); is `flashmesh node serve` running there?"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "refused the cluster token; pass the node's token with --token or FLASHMESH_TOKEN"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"did not answer within {timeout:g} s"
    return f"{code.name.lower()}: {details}"


class Call:
    """A request in flight; result() waits and raises NodeError on failure."""

    def __init__(self, future: grpc.Future, link: NodeClient, timeout: float | None = None) -> None:
        self.sent_at = time.perf_counter()
        self.timeout = timeout or link.timeout
        self.done_at: float | None = None
        self._future = future
        self._link = link
        future.add_done_callback(self._done)  # runs on a gRPC thread: a timestamp, nothing else

    def _done(self, _future) -> None:
        self.done_at = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.done_at or time.perf_counter()) - self.sent_at

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn) -> None:
        self._future.add_done_callback(fn)

    def cancel(self) -> bool:
        return self._future.cancel()

    def result(self):
        try:
            return self._future.result()
        except grpc.RpcError as e:
            raise _error(e, self._link.label, self.timeout, tls=self._link.tls) from None


def open_channel(address: NodeAddress, *, tls: TlsIdentity | None, options: list[tuple]) -> grpc.Channel:
    """Plaintext, or mutual TLS with the cluster CA as the only root. A node known by name (zeroconf
    or NAME@HOST:PORT) must present a certificate for that name; else for the host it is reached at."""
    if tls is None:
        return grpc.insecure_channel(address.target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_pem, private_key=tls.key_pem, certificate_chain=tls.cert_pem
    )
    if address.name:
        options = [*options, ("grpc.ssl_target_name_override", address.name)]
    return grpc.secure_channel(address.target, credentials, options=options)


class NodeClient:
    """One channel to one node."""

    def __init__(
        self,
        address: NodeAddress,
        *,
        token: str,
        timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: TlsIdentity | None = None,
    ) -> None:
        self.address = address
        self.label = address.label
        self.timeout = timeout
        limit = max_message_bytes + 1024 * 1024
        self.tls = tls is not None
        self._channel = open_channel(
            address,
            tls=tls,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
            + RECONNECT_OPTIONS
            + KEEPALIVE_OPTIONS,
        )
        self._stub = pb_grpc.NodeStub(self._channel)
        self._metadata = ((TOKEN_METADATA_KEY, token),)

    def _unary(self, method: str, request, timeout: float | None = None):
        call = getattr(self._stub, method).future(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return Call(call, self, timeout).result()

    def info(self, *, timeout: float | None = None) -> pb.NodeInfo:
        return self._unary("Info", pb.InfoRequest(), timeout)

    def stats(self, *, timeout: float | None = None) -> pb.NodeStats:
        return self._unary("Stats", pb.StatsRequest(), timeout)

    def health(self, *, timeout: float | None = None) -> pb.HealthReply:
        return self._unary("Health", pb.HealthRequest(), timeout)

    def prefetch(self, request: pb.PrefetchRequest, *, timeout: float | None = None) -> pb.PrefetchReply:
        return self._unary("Prefetch", request, timeout)

    def info_async(self, *, timeout: float | None = None) -> Call:
        """Info without waiting (the failover's probe of a node that is down)."""
        future = self._stub.Info.future(pb.InfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata)
        return Call(future, self, timeout)

    def compute_async(self, request: pb.ComputeRequest, *, timeout: float | None = None) -> Call:
        future = self._stub.Compute.future(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return Call(future, self, timeout)

    def close(self) -> None:
        self._channel.close()
