"""The node's request handling, transport-free: validation, token check, statistics, and the one
thread every MLX operation of the node runs on.

`NodeService` takes and returns the protocol's messages (protos.flashmesh_pb2) and raises
`RequestError` with a status name; node.server maps it onto gRPC status codes. Tests drive this
object directly, without a network. Requests are validated on the calling (gRPC) thread with numpy
only; the expert compute is funnelled through a single worker thread, so MLX is never used from
two threads of the node at once.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
from flashmesh.node.cache import ExpertCache
from flashmesh.node.compute import LocalExperts
from flashmesh.node.expert_source import ExpertSource, open_expert_source
from flashmesh.node.shutdown import MlxThread
from flashmesh.node.store_format import RecordError
from flashmesh.protos import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.codec import FLOAT_DTYPES, CodecError, all_finite, decode, encode, to_numpy
from flashmesh.protos.errors import ErrorKind, UserError

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the node refuses or cannot serve; `kind` (protos.errors.ErrorKind) becomes the gRPC
    status code, `records` the (layer, expert) records found damaged (DATA_LOSS), so a coordinator
    can use a replica."""

    def __init__(self, kind: ErrorKind, message: str, *, records: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.records = records


def _store_failure(name: str, e: UserError) -> RequestError:
    if isinstance(e, RecordError):
        return RequestError(ErrorKind.DATA_LOSS, f"node {name}: {e}", records=e.records)
    return RequestError(ErrorKind.INTERNAL, f"node {name}: {e}")


def measure_read_gbps(store: ExpertSource, *, max_bytes: int = 64 * 1024**2, max_records: int = 64) -> float:
    """Flash read bandwidth of this store: parallel whole-record reads, the way the cache reads."""
    jobs = []
    for spec in store.manifest.layers:
        for e in spec.experts:
            if len(jobs) >= max_records or len(jobs) * spec.record_size >= max_bytes:
                break
            jobs.append((spec.layer, e, spec.record_size))
    if not jobs:
        return 0.0
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=store.queue_depth) as pool:
        list(pool.map(lambda j: store.read_raw(j[0], j[1]), jobs))
    seconds = time.perf_counter() - start
    return sum(j[2] for j in jobs) / seconds / 1e9 if seconds > 0 else 0.0


class NodeService:
    """Serves the experts one store (usually a shard) holds, under a RAM budget."""

    def __init__(
        self,
        store_path: Path,
        *,
        ram_budget: int,
        token: str,
        name: str = "node",
        page_cache: bool = False,
        huge_pages: bool = True,
        verify: bool = True,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        flash_gbps: float | None = None,
        bundle: bool = False,
        shard: dict | None = None,
    ) -> None:
        """`store_path` is a store or shard, or with `bundle` an iOS bundle whose records are served (all,
        or with `shard` = {"index", "count", "replicas"} the experts that shard of the store holds)."""
        if not token:
            raise UserError("a node needs a cluster token")
        self.token = token
        self.name = name
        self.node_id = uuid.uuid4().hex[:12]
        self.max_message_bytes = max_message_bytes
        self._mlx = MlxThread()
        self.store = open_expert_source(
            Path(store_path), bundle=bundle, page_cache=page_cache, verify=verify, shard=shard
        )
        try:
            self.manifest = self.store.manifest
            self.cache = ExpertCache(self.store, budget_bytes=ram_budget, huge_pages=huge_pages)
            self.hidden_size = max(s.input_dim for s in self.manifest.layers)  # what pack saw the banks take
            self._input_dim = {s.layer: s.input_dim for s in self.manifest.layers}
            self.top_k = self.manifest.top_k
            self._held = {}
            for spec in self.manifest.layers:
                mask = np.zeros(spec.num_experts, dtype=bool)
                mask[spec.experts] = True
                self._held[spec.layer] = mask
            self.experts = self._mlx.submit(lambda: LocalExperts(self.cache, self.store.templates())).result()
            self.flash_gbps = measure_read_gbps(self.store) if flash_gbps is None else flash_gbps
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._counters = dict(requests=0, pairs=0, bytes_in=0, bytes_out=0, rejected=0)
        self._busy = 0.0
        self._started = time.monotonic()

    # --- checks (any thread, no MLX) ---------------------------------------------------------

    def check_token(self, given: str | None) -> None:
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            self._count(rejected=1)
            raise RequestError(ErrorKind.UNAUTHENTICATED, "missing or wrong cluster token")

    def invalid(self, message: str) -> RequestError:
        self._count(rejected=1)
        return RequestError(ErrorKind.INVALID_ARGUMENT, message)

    def _check_layer(self, layer: int) -> np.ndarray:
        if layer not in self._held:
            raise self.invalid(f"layer {layer} is not a MoE layer of this model")
        return self._held[layer]

    def _validate_compute(self, req: pb.ComputeRequest) -> tuple[np.ndarray, np.ndarray]:
        size = req.ByteSize()
        if size > self.max_message_bytes:
            raise self.invalid(f"request of {size} bytes exceeds this node's limit of {self.max_message_bytes}")
        held = self._check_layer(req.layer)
        try:
            x = to_numpy(req.x)
            rows = to_numpy(req.rows)
            experts = to_numpy(req.experts)
        except CodecError as e:
            raise self.invalid(str(e)) from None
        d = self._input_dim[req.layer]
        if req.x.dtype not in FLOAT_DTYPES or x.ndim != 2 or x.shape[1] != d or x.shape[0] == 0:
            raise self.invalid(f"x must be a float tensor [M, {d}] with M > 0, got {req.x.dtype} {list(x.shape)}")
        if not all_finite(req.x):
            raise self.invalid("x holds NaN or infinite values")
        for label, t, a in (("rows", req.rows, rows), ("experts", req.experts, experts)):
            if t.dtype != "int32" or a.ndim != 1:
                raise self.invalid(f"{label} must be an int32 vector, got {t.dtype} {list(a.shape)}")
        if rows.shape != experts.shape or rows.size == 0:
            raise self.invalid(
                f"rows and experts must have the same non-zero length, got {rows.size} and {experts.size}"
            )
        if rows.size > x.shape[0] * self.top_k:
            raise self.invalid(f"{rows.size} pairs for {x.shape[0]} tokens exceeds top-k {self.top_k} per token")
        if rows.min() < 0 or rows.max() >= x.shape[0]:
            raise self.invalid(f"rows must index the {x.shape[0]} rows of x")
        if experts.min() < 0 or experts.max() >= held.size or not held[experts].all():
            bad = sorted({int(e) for e in experts if not (0 <= e < held.size and held[e])})
            raise self.invalid(f"layer {req.layer}: experts {bad[:8]} are not held by node {self.name}")
        if req.HasField("next"):
            self._check_held(req.next.layer, req.next.experts, what="hint")
        return rows, experts

    def _check_held(self, layer: int, experts, *, what: str) -> list[int]:
        held = self._check_layer(layer)
        wanted = sorted(set(experts))
        if any(not (0 <= e < held.size and held[e]) for e in wanted):
            raise self.invalid(f"layer {layer}: {what} names experts not held by node {self.name}")
        return wanted

    # --- RPCs --------------------------------------------------------------------------------

    def info(self) -> pb.NodeInfo:
        layers = [
            pb.LayerHoldings(
                layer=s.layer, num_experts=s.num_experts, experts=list(s.experts), expert_bytes=s.payload_bytes
            )
            for s in self.manifest.layers
        ]
        return pb.NodeInfo(
            node_id=self.node_id,
            name=self.name,
            fingerprint=self.manifest.fingerprint,
            protocol_version=PROTOCOL_VERSION,
            layers=layers,
            ram_budget_bytes=self.cache.budget_bytes,
            flash_read_gbps=self.flash_gbps,
            max_message_bytes=self.max_message_bytes,
            hidden_size=self.hidden_size,
            model_type=str(self.manifest.config.get("model_type", "")),
            flash_reader=self.store.reader,
        )

    def compute(self, req: pb.ComputeRequest) -> pb.ComputeReply:
        rows, experts = self._validate_compute(req)
        start = time.perf_counter()
        try:
            reply = self._mlx.submit(self._compute, req, rows, experts).result()
        except UserError as e:
            raise _store_failure(self.name, e) from None
        seconds = time.perf_counter() - start
        reply.compute_seconds = seconds
        self._count(requests=1, pairs=int(rows.size), bytes_in=req.ByteSize(), bytes_out=reply.ByteSize())
        with self._lock:
            self._busy += seconds
        return reply

    def _compute(self, req: pb.ComputeRequest, rows: np.ndarray, experts: np.ndarray) -> pb.ComputeReply:
        # Runs on the MLX thread.
        if req.HasField("next") and req.next.experts:
            # LocalExperts starts these reads once this call's experts are pinned, so they overlap it.
            self.experts.hint(req.next.layer, list(req.next.experts))  # most likely first
        x = decode(req.x)  # [M, D]
        pairs_x = x[mx.array(rows)]  # [P, D]
        y = self.experts.compute(req.layer, pairs_x, mx.array(experts)[:, None])  # [P, 1, D]
        reply = pb.ComputeReply(y=encode(y[:, 0]))  # [P, D]
        self.experts.settle()  # the reply is computed: nothing of this request stays pinned
        return reply

    def prefetch(self, req: pb.PrefetchRequest) -> pb.PrefetchReply:
        experts = self._check_held(req.layer, req.experts, what="prefetch")
        start = time.perf_counter()
        try:
            resident = self._mlx.submit(self._prefetch, req.layer, experts).result()
        except UserError as e:
            raise _store_failure(self.name, e) from None
        with self._lock:
            self._busy += time.perf_counter() - start
        return pb.PrefetchReply(resident=resident)

    def _prefetch(self, layer: int, experts: list[int]) -> int:
        # Runs on the MLX thread: starts the reads (they finish in the store's threads).
        self.experts.prefetch(layer, experts)
        return sum((layer, e) in self.cache for e in experts)

    def stats(self) -> pb.NodeStats:
        # Plain reads of counters the MLX thread updates: a snapshot, possibly mid-request.
        s = self.cache.stats
        with self._lock:
            counters, busy = dict(self._counters), self._busy
        return pb.NodeStats(
            **s.proto_fields(),
            cache_bytes=self.cache.bytes,
            ram_budget_bytes=self.cache.budget_bytes,
            busy_seconds=busy,
            uptime_seconds=time.monotonic() - self._started,
            **counters,
        )

    def health(self) -> pb.HealthReply:
        return pb.HealthReply(serving=True, node_id=self.node_id)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._counters[key] += value

    def close(self) -> None:
        if getattr(self, "cache", None) is not None:
            try:
                self._mlx.submit(self.cache.drain).result()  # reads in flight finish before the store closes
            except UserError as e:
                log.warning("node %s: a read ahead failed while closing: %s", self.name, e)
        self._mlx.shutdown()  # releases the thread's MLX state: no abort at exit
        self.store.close()
