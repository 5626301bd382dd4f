"""What RemoteExperts (coordinator.remote) needs of a connection to a node: coordinator.client's
gRPC NodeClient, or testing.in_process.InProcessLink."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from flashmesh.protos import flashmesh_pb2 as pb


class PendingReply(Protocol):
    seconds: float

    def done(self) -> bool: ...

    def result(self): ...

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Call `fn` (on any thread; it only sets an event) once the reply is in or failed."""
        ...

    def cancel(self) -> bool: ...


class NodeLink(Protocol):
    """What RemoteExperts needs of a node: coordinator.client.NodeClient, or InProcessLink in tests."""

    label: str

    def compute_async(self, request: pb.ComputeRequest, *, timeout: float | None = None) -> PendingReply: ...

    def info_async(self, *, timeout: float | None = None) -> PendingReply: ...

    def prefetch(self, request: pb.PrefetchRequest, *, timeout: float | None = None) -> pb.PrefetchReply: ...

    def stats(self, *, timeout: float | None = None) -> pb.NodeStats: ...

    def close(self) -> None: ...


class Relink(Protocol):
    """A node's link at the address discovery saw it announce last, when that moved (else None);
    coordinator.cluster.Relinker over coordinator.node_watch.NodeWatcher."""

    def __call__(self, node_id: str) -> NodeLink | None: ...

    def close(self) -> None: ...
