"""ReadQueue: reader threads that keep record reads in flight continuously, across layers.

Every read the cache wants (a layer's misses, a read-ahead, a background fill) becomes one job per
record (or per chunk of a large record) on one queue served by `threads` reader threads, so as
many reads as there are threads are in flight as long as any are wanted: nothing waits for a whole
layer's batch to finish before the next layer's reads start. Reads a caller is blocked on go to the
front (`urgent`); read-aheads and fills behind them, and a caller that comes to need a read-ahead
moves what is left of it to the front (`promote`).

A reader thread does the whole record: one aligned `preadv` into a reused page-aligned staging
buffer (O_DIRECT needs the alignment), its xxh3 checksum, and the copy of each tensor into the
expert's reserved slab slot (node/slab.py). All three release the GIL, so the thread that runs MLX
only waits for the batch it needs (`SlotReads.wait`) and never touches the bytes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

from flashmesh.node.store_format import RecordError, checksum


@dataclass(frozen=True)
class RecordPlan:
    """How one layer's records land in a slab: where to read, what to check, where each tensor goes."""

    layer: int
    fd: int
    record_size: int
    offsets: dict[int, int]  # expert -> byte offset of its record in the layer file
    checksums: dict[int, str] | None  # expert -> xxh3 (None: no verification)
    tensors: tuple[tuple[int, int, int, int], ...]  # (offset in record, bytes, slab slot-0 address, slot stride)
    file: str  # for error messages
    remedy: str


class _Record:
    __slots__ = ("reads", "expert", "slot", "chunks_left", "buffer", "failed")

    def __init__(self, reads: SlotReads, expert: int, slot: int, chunks: int) -> None:
        self.reads, self.expert, self.slot, self.chunks_left = reads, expert, slot, chunks
        self.buffer: mmap.mmap | None = None
        self.failed = False


class SlotReads:
    """The records of one layer being read into reserved slab slots; `wait()` on the submitting thread."""

    def __init__(self, queue: ReadQueue, plan: RecordPlan, slots: dict[int, int]) -> None:
        self.queue, self.plan, self.slots = queue, plan, slots
        self.layer = plan.layer
        self.experts = list(slots)
        self.started = time.perf_counter()
        self.finished = 0.0  # when the last record landed
        self.left = len(slots)
        self.error: Exception | None = None
        self.jobs: list[tuple[_Record, int, int]] = []

    def done(self) -> bool:
        return self.left == 0

    @property
    def seconds(self) -> float:
        """Submission to the last record landed (reads overlapped with anything else count once)."""
        return max(0.0, self.finished - self.started)

    def wait(self) -> dict[int, int]:
        """Block until every record has landed; return expert -> slot, or raise the first error."""
        if self.left:
            self.queue.promote(self)
            with self.queue.landed:
                while self.left:
                    self.queue.landed.wait()
        if self.error is not None:
            raise self.error
        return self.slots


class ReadQueue:
    """`threads` reader threads over one two-level job queue (urgent first)."""

    def __init__(self, threads: int, *, chunk_bytes: int, name: str = "flashmesh-read") -> None:
        self.chunk_bytes = chunk_bytes
        self._urgent: deque = deque()
        self._later: deque = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self.landed = threading.Condition()  # notified whenever a batch completes
        self._buffers: dict[int, list[mmap.mmap]] = {}
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, plan: RecordPlan, slots: dict[int, int], *, urgent: bool) -> SlotReads:
        """Queue the records of `slots` (expert -> reserved slot) of `plan.layer`; does not wait."""
        reads = SlotReads(self, plan, slots)
        size, chunk = plan.record_size, self.chunk_bytes
        for expert, slot in slots.items():
            offsets = range(0, size, chunk)
            record = _Record(reads, expert, slot, len(offsets))
            reads.jobs.extend((record, o, min(chunk, size - o)) for o in offsets)
        with self._work:
            if self._closed:
                raise RuntimeError("read queue is closed")
            (self._urgent if urgent else self._later).extend(reads.jobs)
            self._work.notify(len(reads.jobs))
        return reads

    def promote(self, reads: SlotReads) -> None:
        """Move the not yet started jobs of `reads` ahead of everything else."""
        with self._work:
            if not self._later:
                return
            mine = set(map(id, reads.jobs))
            kept = [j for j in self._later if id(j) not in mine]
            if len(kept) != len(self._later):
                moved = [j for j in self._later if id(j) in mine]
                self._later = deque(kept)
                self._urgent.extendleft(reversed(moved))

    def _next(self) -> tuple[_Record, int, int] | None:
        with self._work:
            while not self._urgent and not self._later:
                if self._closed:
                    return None
                self._work.wait()
            job = self._urgent.popleft() if self._urgent else self._later.popleft()
            record = job[0]
            if record.buffer is None:
                size = record.reads.plan.record_size
                pool = self._buffers.get(size)
                record.buffer = pool.pop() if pool else mmap.mmap(-1, size)  # anonymous: page aligned
            return job

    def _serve(self) -> None:
        while (job := self._next()) is not None:
            record, offset, length = job
            reads, plan = record.reads, record.reads.plan
            try:
                if not record.failed:
                    view = memoryview(record.buffer)[offset : offset + length]
                    got = os.preadv(plan.fd, [view], plan.offsets[record.expert] + offset)
                    if got != length:
                        raise RecordError(
                            plan.layer,
                            record.expert,
                            f"short read ({offset + got} of {plan.record_size} bytes); the store file is "
                            "truncated, re-run `flashmesh pack`",
                        )
            except Exception as e:  # noqa: BLE001 - handed to the waiter, which raises it
                record.failed = True
                reads.error = reads.error or e
            with self._lock:
                record.chunks_left -= 1
                last = record.chunks_left == 0
            if last:
                self._land(record)

    def _land(self, record: _Record) -> None:
        """All chunks read: verify, copy the tensors into the slot, give the buffer back, count the record."""
        reads, plan = record.reads, record.reads.plan
        buffer = record.buffer
        try:
            if not record.failed:
                if plan.checksums is not None and checksum(buffer) != plan.checksums[record.expert]:
                    raise RecordError(
                        plan.layer,
                        record.expert,
                        f"record checksum mismatch in {plan.file}; the flash copy is corrupt, {plan.remedy}",
                    )
                source = _address(buffer)
                for offset, nbytes, base, stride in plan.tensors:
                    ctypes.memmove(base + record.slot * stride, source + offset, nbytes)
        except Exception as e:  # noqa: BLE001
            reads.error = reads.error or e
        with self._lock:
            pool = self._buffers.setdefault(plan.record_size, [])
            if len(pool) < 2 * len(self._threads):
                pool.append(buffer)
        record.buffer = None
        with self.landed:
            reads.left -= 1
            if reads.left == 0:
                reads.finished = time.perf_counter()
                self.landed.notify_all()

    def close(self) -> None:
        with self._work:
            self._closed = True
            self._urgent.clear()
            self._later.clear()
            self._work.notify_all()
        for t in self._threads:
            t.join()


def _address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
