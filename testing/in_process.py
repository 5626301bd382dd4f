"""InProcessLink: a node service called directly, no network, for tests and single-process experiments."""

from __future__ import annotations

import time
from concurrent.futures import Future

from flashmesh.coordinator.failover import NodeError
from flashmesh.coordinator.remote import PendingReply
from flashmesh.node.service import RequestError
from flashmesh.protos import flashmesh_pb2 as pb


class InProcessLink:
    """A node object called directly (no network): for tests and single-process experiments. A node
    refusal (RequestError) becomes the NodeError a gRPC link would raise; there is no deadline."""

    def __init__(self, service, label: str = "in-process") -> None:
        self.service = service
        self.label = label

    def _call(self, method, *args) -> PendingReply:
        start = time.perf_counter()
        future: Future = Future()
        try:
            future.set_result(method(*args))
        except RequestError as e:
            future.set_exception(NodeError(f"node {self.label}: {e}", kind=e.kind, records=e.records))
        except Exception as e:  # noqa: BLE001 - handed to the caller through result()
            future.set_exception(e)
        future.seconds = time.perf_counter() - start
        return future

    def compute_async(self, request: pb.ComputeRequest, *, timeout: float | None = None) -> PendingReply:
        return self._call(self.service.compute, request)

    def info_async(self, *, timeout: float | None = None) -> PendingReply:
        return self._call(self.service.info)

    def prefetch(self, request: pb.PrefetchRequest, *, timeout: float | None = None) -> pb.PrefetchReply:
        return self._call(self.service.prefetch, request).result()

    def stats(self, *, timeout: float | None = None) -> pb.NodeStats:
        return self._call(self.service.stats).result()

    def close(self) -> None:
        """Nothing to let go of: the service belongs to whoever made it."""
