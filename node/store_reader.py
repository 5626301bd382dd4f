"""ExpertStore: aligned parallel reads of whole expert records from flash.

One record = one aligned pread into a page-aligned buffer. Reads are issued from reader threads
(os.preadv releases the GIL) so several are in flight: flash bandwidth needs queue depth. The
cache's reads (`load`) go straight into its slab slots through node/read_queue.py, which keeps
reads in flight across layers; `submit`/`read` hand out records as MLX arrays (tools, conversions).
The default goes around the OS page cache (O_DIRECT on Linux, F_NOCACHE on macOS) so that the
engine's cache and its byte budget are the whole story; `page_cache=True` lets the OS help.
Experts are never mmapped: page faults would serialize reads at queue depth 1.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmesh.node.experts import expert_templates
from flashmesh.node.read_queue import Load, ReadQueue
from flashmesh.node.record_plan import RecordPlan, can_scatter
from flashmesh.node.slab import Slab, signature
from flashmesh.node.store_format import RECORD_ALIGN, LayerSpec, Manifest, RecordError, TensorSpec, checksum
from flashmesh.protos.codec import DTYPES
from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)

F_NOCACHE = 48  # macOS fcntl command; not exported by Python's fcntl module
_PAGE = 4096  # O_DIRECT buffer alignment (covers 512 B and 4 KiB logical blocks)
# A read-ahead starts only while the reads in flight, demand reads too, hold less than this many
# bytes with it (or none are in flight): a demand read then shares the flash with little, and waits
# for no read-ahead queued after it. One multi-MB record alone reads at 0.95 of eight (`bench io`
# --queue-depths 1,8 on the realistic big store), and 96 KiB records keep all of the queue's depth.
READ_AHEAD_BYTES = 4 * 2**20


@dataclass
class ReadStats:
    records: int = 0
    bytes: int = 0
    seconds: float = 0.0  # wall time spent waiting for reads


def _tensor_view(raw: mx.array, skew: int, t: TensorSpec) -> mx.array:
    """One tensor of a record as a view of the record's MLX buffer (no copy)."""
    start = skew + t.offset
    return raw[start : start + t.nbytes].view(DTYPES[t.dtype][1]).reshape(t.shape)


class PendingRead:
    """Reads in flight for one layer; `result()` (on the thread that submitted) waits and checks."""

    def __init__(
        self,
        store: ExpertStore,
        layer: int,
        raws: dict[int, mx.array],
        jobs: dict[int, tuple[int, list[Future]]],
        started: float,
    ) -> None:
        self.store, self.layer, self.raws, self.jobs, self.started = store, layer, raws, jobs, started
        self.experts = list(raws)

    def done(self) -> bool:
        return all(f.done() for _, futures in self.jobs.values() for f in futures)

    def result(self) -> dict[int, dict[str, mx.array]]:
        return self.store._finish(self)


def _open_bypassing_cache(path: Path) -> tuple[int, bool]:
    """Open for reading around the page cache where the OS and filesystem allow it."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:  # tmpfs and some filesystems refuse O_DIRECT
            log.warning("%s: filesystem refuses O_DIRECT; reading through the page cache", path)
            return os.open(path, os.O_RDONLY), False
    fd = os.open(path, os.O_RDONLY)
    if sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, F_NOCACHE, 1)
        return fd, True
    return fd, False


class ExpertStore:
    """Reads expert records of one store; thread-safe reads, MLX arrays made on the caller's thread."""

    remedy = "re-pack or re-copy the store"  # what a user does about a corrupt record

    def __init__(
        self,
        path: Path,
        *,
        page_cache: bool = False,
        queue_depth: int = 8,
        verify: bool = True,
        chunk_bytes: int = 8 * 1024 * 1024,
        aio: bool = True,
        manifest: Manifest | None = None,
        record_specs: dict[int, LayerSpec] | None = None,
        read_ahead_bytes: int = READ_AHEAD_BYTES,
    ) -> None:
        """`manifest` and `record_specs` let a subclass read another layout (node.bundle_source): the
        manifest describes the arrays handed out (what the cache counts), `record_specs` the records on
        flash (size, offset, checksum, tensor table); by default both are the store's. `aio`: O_DIRECT
        records go through Linux AIO where it is built (node/aio_reads.py); False: reader threads only.
        `read_ahead_bytes`: a read-ahead starts only below this many bytes in flight (0: no limit)."""
        self.path = Path(path)
        self.manifest = manifest or Manifest.load(self.path)
        self.page_cache = page_cache
        self.verify = verify
        self.queue_depth = queue_depth
        self.chunk_bytes = max(RECORD_ALIGN, chunk_bytes // RECORD_ALIGN * RECORD_ALIGN)
        self.bypassing_cache = False
        self._fds: dict[int, int] = {}
        self._layers = {s.layer: s for s in self.manifest.layers}
        self._specs = record_specs or self._layers
        for spec in self._specs.values():
            self._fds[spec.layer] = self._open(spec)
        self._direct = self.direct
        self._pool = ThreadPoolExecutor(max_workers=queue_depth, thread_name_prefix="flashmesh-read")
        self._queue = ReadQueue(queue_depth, chunk_bytes=self.chunk_bytes, later_limit=read_ahead_bytes, aio=aio)
        self._plans: dict[tuple[int, int], RecordPlan] = {}
        self._buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.stats = ReadStats()

    @property
    def reader(self) -> str:
        """What reads records into slab slots: "aio" (Linux AIO on O_DIRECT files, every record read
        straight into its slot) or "threads" (anything else: staged or converted records, no AIO)."""
        scattered = self._direct and all(self._scatters(spec) for spec in self._specs.values())
        return "aio" if self._queue.ring is not None and self.bypassing_cache and scattered else "threads"

    def _scatters(self, spec: LayerSpec) -> bool:
        """Whether `spec`'s records are read straight into their slots (every tensor whole pages)."""
        tensors = [(t.offset, t.nbytes, None) for t in spec.tensors]
        return can_scatter(tensors, spec.record_size, chunk_bytes=self.chunk_bytes, page=_PAGE)

    def _open(self, spec: LayerSpec) -> int:
        path = self.path / spec.file
        if not path.is_file():
            raise UserError(f"{path} is missing; the store is incomplete, re-run `flashmesh pack`")
        expected = len(spec.experts) * spec.record_size
        if path.stat().st_size < expected:
            raise UserError(f"{path} is truncated ({path.stat().st_size} of {expected} bytes); re-run `flashmesh pack`")
        if self.page_cache:
            return os.open(path, os.O_RDONLY)
        fd, bypassing = _open_bypassing_cache(path)
        self.bypassing_cache = self.bypassing_cache or bypassing
        return fd

    def layer(self, layer: int) -> LayerSpec:
        return self._layers[layer]

    def record_bytes(self, layer: int) -> int:
        """Bytes one record of `layer` takes on flash (a bundle's records differ from the arrays handed out)."""
        return self._specs[layer].record_size

    def templates(self) -> dict[int, nn.Module]:
        """layer -> the model's routed-expert module that computes with the arrays this store hands out."""
        return expert_templates(self.path)

    def _arrays(self, raw: mx.array, skew: int, spec: LayerSpec) -> dict[str, mx.array]:
        """One record read into `raw` (at `skew`) -> its tensors: views, no copy (called on the caller's thread)."""
        return {t.name: _tensor_view(raw, skew, t) for t in spec.tensors}

    def _buffer(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._buffers):
                if len(buf) >= size:
                    return self._buffers.pop(i)
        return mmap.mmap(-1, size)  # anonymous memory: page aligned, as O_DIRECT requires

    def _release(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._buffers) < 2 * self.queue_depth:
                self._buffers.append(buf)

    def _read_one(self, layer: int, expert: int) -> mmap.mmap:
        spec = self._specs[layer]
        buf = self._buffer(spec.record_size)
        view = memoryview(buf)[: spec.record_size]
        try:
            got = os.preadv(self._fds[layer], [view], spec.record_offset(expert))
        except OSError as e:  # EIO, a file gone from under us: this record is lost
            self._release(buf)
            raise self._unreadable(spec, expert, e) from None
        problem = self._problem(spec, expert, got, view)
        if problem is not None:
            self._release(buf)
            raise problem
        return buf

    def _problem(self, spec: LayerSpec, expert: int, got: int, data) -> RecordError | None:
        """Why `got` bytes read into `data` are not `expert`'s record (short read, checksum); None if they are."""
        if got != spec.record_size:
            return RecordError(
                spec.layer,
                expert,
                f"short read ({got} of {spec.record_size} bytes); the store file is truncated, re-run `flashmesh pack`",
            )
        if self.verify and checksum(data) != spec.record_checksum(expert):
            return RecordError(
                spec.layer,
                expert,
                f"record checksum mismatch in {self.path / spec.file}; the flash copy is corrupt, {self.remedy}",
            )
        return None

    def _unreadable(self, spec: LayerSpec, expert: int, e: OSError) -> RecordError:
        return RecordError(spec.layer, expert, f"cannot read {self.path / spec.file} ({e.strerror}); {self.remedy}")

    def _read_chunk(self, layer: int, expert: int, view: memoryview, offset: int) -> int:
        """Reader thread: one aligned pread into (a slice of) MLX-owned memory; nothing else."""
        return os.preadv(self._fds[layer], [view], offset)

    def submit(self, layer: int, experts: list[int]) -> PendingRead:
        """Start reading whole records of `experts`; MLX buffers are made here, on the caller's thread.

        Each record is read straight into the memory of one MLX uint8 array (page aligned inside
        it, as O_DIRECT requires); the tensors handed out are views of that array, so no byte is
        copied between the read and the cache. Large records are split into `chunk_bytes` preads so
        that even a few records keep `queue_depth` reads in flight.
        """
        spec = self._specs[layer]
        size = spec.record_size
        raws = {e: mx.zeros((size + _PAGE,), dtype=mx.uint8) for e in experts}
        mx.eval(list(raws.values()))
        jobs: dict[int, tuple[int, list[Future]]] = {}
        for e, raw in raws.items():
            host = np.array(raw, copy=False)  # a writable view of the MLX buffer
            skew = (-host.ctypes.data) % _PAGE
            view = memoryview(host)[skew : skew + size]
            base = spec.record_offset(e)
            futures = [
                self._pool.submit(self._read_chunk, layer, e, view[o : o + self.chunk_bytes], base + o)
                for o in range(0, size, self.chunk_bytes)
            ]
            jobs[e] = (skew, futures)
        return PendingRead(self, layer, raws, jobs, time.perf_counter())

    @property
    def direct(self) -> bool:
        """Records hold the cache's tensors byte for byte (a store), so reader threads copy them into
        slab slots as they are; else (a bundle) records are converted on the caller's thread."""
        return all(
            signature(self._specs[layer]) == signature(spec)
            and [t.offset for t in self._specs[layer].tensors] == [t.offset for t in spec.tensors]
            for layer, spec in self._layers.items()
        )

    def load(self, layer: int, slots: dict[int, int], slab: Slab, *, urgent: bool) -> Load:
        """Start reading the records of `slots` (expert -> reserved slot of `slab`) into those slots.
        `urgent`: the caller is about to wait for them (they go ahead of read-aheads). Does not wait."""
        if not self._direct:
            return ConvertedReads(self, layer, slots, slab)
        plan = self._plans.get((layer, id(slab)))
        if plan is None:
            spec = self._specs[layer]
            tensors = tuple((t.offset, t.nbytes, slab.rows[t.name]) for t in spec.tensors)
            plan = self._plans[(layer, id(slab))] = RecordPlan(
                layer=layer,
                fd=self._fds[layer],
                record_size=spec.record_size,
                offsets={e: spec.record_offset(e) for e in spec.experts},
                checksums={e: spec.record_checksum(e) for e in spec.experts} if self.verify else None,
                tensors=tensors,
                file=str(self.path / spec.file),
                remedy=self.remedy,
                scatter=self._scatters(spec),
            )
        return self._queue.submit(plan, slots, urgent=urgent)

    def landed(self, reads: Load) -> None:
        """Count a finished load in `stats` (on the caller's thread)."""
        self.stats.records += len(reads.slots)
        self.stats.bytes += len(reads.slots) * self._specs[reads.layer].record_size
        self.stats.seconds += reads.seconds

    def read(self, layer: int, experts: list[int]) -> dict[int, dict[str, mx.array]]:
        """Fetch whole records of `experts` in parallel; return expert -> {tensor name: array}."""
        return self.submit(layer, experts).result()

    def _finish(self, pending: PendingRead) -> dict[int, dict[str, mx.array]]:
        spec = self._specs[pending.layer]
        size = spec.record_size
        out: dict[int, dict[str, mx.array]] = {}
        error: Exception | None = None
        failed: list[tuple[int, int]] = []  # records that could not be used (all of them, for DATA_LOSS)
        for e, (skew, futures) in pending.jobs.items():
            try:
                got = sum(f.result() for f in futures)
            except OSError as exc:  # EIO, a file gone from under us: this record is lost, the rest may not be
                failed.append((pending.layer, e))
                error = error or self._unreadable(spec, e, exc)
                continue
            except Exception as exc:  # collect, finish the other reads, then raise the first
                error = error or exc
                continue
            raw = pending.raws[e]
            problem = self._problem(spec, e, got, memoryview(np.array(raw, copy=False))[skew : skew + size])
            if problem is not None:
                failed.append((pending.layer, e))
                error = error or problem
                continue
            out[e] = self._arrays(raw, skew, spec)
        mx.eval([a for arrays in out.values() for a in arrays.values()])
        elapsed = time.perf_counter() - pending.started
        with self._lock:
            self.stats.records += len(out)
            self.stats.bytes += len(out) * size
            self.stats.seconds += elapsed
        if isinstance(error, RecordError):
            error.records = tuple(failed)
        if error is not None:
            raise error
        return out

    def read_raw(self, layer: int, expert: int) -> bytes:
        """One record's bytes, checksum-verified (for shipping records, tests and verification)."""
        buf = self._read_one(layer, expert)
        try:
            return bytes(memoryview(buf)[: self._specs[layer].record_size])
        finally:
            self._release(buf)

    def close(self) -> None:
        self._queue.close()
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ConvertedReads:
    """A load of records that need converting (a bundle's): read by the store's threads, converted
    and copied into the slots on the thread that waits."""

    def __init__(self, store: ExpertStore, layer: int, slots: dict[int, int], slab: Slab) -> None:
        self.layer, self.slots, self.slab = layer, slots, slab
        self.experts = list(slots)
        self._pending = store.submit(layer, list(slots))
        self.started, self._seconds = time.perf_counter(), 0.0

    def done(self) -> bool:
        return self._pending.done()

    def drop(self) -> bool:
        """Never: its chunks went to the store's pool when it was made, and one might have started."""
        return False

    @property
    def seconds(self) -> float:
        return self._seconds

    def wait(self) -> dict[int, int]:
        fetched = self._pending.result()
        for e, tensors in fetched.items():
            self.slab.fill(self.slots[e], tensors)
        self._seconds = time.perf_counter() - self.started
        return self.slots
