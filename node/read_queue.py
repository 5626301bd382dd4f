"""ReadQueue: reader threads that keep record reads in flight continuously, across layers.

Every read the cache wants (a layer's misses, a read-ahead, a background fill) becomes one job per
record (or per chunk of a large record) on one queue served by `threads` reader threads, so as
many reads as there are threads are in flight as long as any are wanted: nothing waits for a whole
layer's batch to finish before the next layer's reads start. Reads a caller is blocked on go to the
front (`urgent`); read-aheads and fills behind them, and a caller that comes to need a read-ahead
moves what is left of it to the front (`promote`). A read-ahead starts only while the reads in
flight, demand reads included, hold less than `later_limit` bytes with it (or none are in flight):
demand reads then never share the flash with read-aheads started after them, one arriving shares
it with little, and a read-ahead not yet started can be taken back (`drop`).

A record whose tensors are whole pages is read by one `preadv` straight into the expert's reserved
slab slot (node/slab.py), its padding into the reader's own buffer, and checked (xxh3, ~2 us for
96 KiB) by that reader: no hand-off. Any other record is read in aligned chunks into a reused
page-aligned staging buffer (O_DIRECT needs the alignment) and handed to a landing thread, which
checks it and copies each tensor into the slot, so that copies never hold a read slot: `threads`
reads stay in flight as fio's `iodepth` does. Reads, checksums and copies release the GIL; the
thread that runs MLX only waits for the batch it needs (`SlotReads.wait`) and never touches the
bytes. Staging buffers are bounded (readers wait for a permit when the landing threads fall
behind).

On Linux, where the compiled AIO reader is built, records that go straight into their slots from
an O_DIRECT file skip the threads: `threads` reads stay in flight in the kernel's AIO, and no Python
runs per record (node/aio_reads.py). Its queue keeps the same order and limit (urgent first,
`promote`, `later_limit`, `drop`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections import deque
from typing import Protocol

import xxhash
from flashmesh.node import aio_reads
from flashmesh.node.record_plan import RecordPlan, lost, mismatch, short_read
from flashmesh.node.store_format import checksum


class Load(Protocol):
    """Records of one layer on their way into reserved slab slots (any reader's)."""

    layer: int
    slots: dict[int, int]  # expert -> slot
    started: float  # time.perf_counter() at submission

    def done(self) -> bool: ...

    def drop(self) -> bool:
        """If none of its records has started, finish them all unread and return True (the slots are
        the caller's again; `wait` raises); else change nothing and return False."""
        ...

    @property
    def seconds(self) -> float:
        """Submission to the last record landed."""
        ...

    def wait(self) -> dict[int, int]:
        """Block until every record has landed; return `slots`, or raise the first error."""
        ...


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

    def drop(self) -> bool:
        return self.queue.drop(self)

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
    """`threads` reader threads over one two-level job queue (urgent first); a read-ahead job starts
    only while the jobs being read hold less than `later_limit` bytes with it (or none are being
    read; 0: no limit), so that demand reads share the flash with little of them."""

    def __init__(
        self,
        threads: int,
        *,
        chunk_bytes: int,
        later_limit: int = 0,
        landers: int = 2,
        aio: bool = True,
        name: str = "flashmesh-read",
    ) -> None:
        """`aio`: read O_DIRECT records that can go straight into their slots through Linux AIO
        (node/aio_reads.py) where it is built; the threads read everything else."""
        self.chunk_bytes = chunk_bytes
        self.later_limit = later_limit
        self._reading_bytes = 0  # of the jobs being read, urgent or not
        self.ring = aio_reads.open_ring(threads, later_limit=later_limit) if aio else None
        self._takes_aio: dict[int, bool] = {}  # fd -> opened O_DIRECT
        self._urgent: deque = deque()
        self._later: deque = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self.landed = threading.Condition()  # notified whenever a batch completes
        self._buffers: dict[int, list[mmap.mmap]] = {}
        self._landing: deque[_Record] = deque()  # read, waiting to be checked and copied
        self._land_work = threading.Condition()
        self._permits = threading.Semaphore(2 * threads + landers)  # records holding a staging buffer
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        self._landers = [
            threading.Thread(target=self._land_loop, name=f"{name}-land-{i}", daemon=True) for i in range(landers)
        ]
        for t in self._threads + self._landers:
            t.start()

    def submit(self, plan: RecordPlan, slots: dict[int, int], *, urgent: bool) -> Load:
        """Queue the records of `slots` (expert -> reserved slot) of `plan.layer`; does not wait."""
        if self.ring is not None and plan.scatter:
            if plan.fd not in self._takes_aio:
                self._takes_aio[plan.fd] = aio_reads.takes_aio(plan.fd)
            if self._takes_aio[plan.fd]:
                return aio_reads.AioReads(self.ring, plan, slots, urgent=urgent)
        reads = SlotReads(self, plan, slots)
        size, chunk = plan.record_size, (plan.record_size if plan.scatter else self.chunk_bytes)
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

    def drop(self, reads: SlotReads) -> bool:
        """Take `reads`'s jobs out of the queue if none has started; say whether (then it is done)."""
        with self._work:
            mine = set(map(id, reads.jobs))
            queued = [j for j in (*self._urgent, *self._later) if id(j) in mine]
            if not reads.jobs or len(queued) != len(reads.jobs):
                return False
            self._urgent = deque(j for j in self._urgent if id(j) not in mine)
            self._later = deque(j for j in self._later if id(j) not in mine)
        with self.landed:
            reads.error = RuntimeError("these reads were dropped before they started")
            reads.left, reads.finished = 0, time.perf_counter()
            self.landed.notify_all()
        return True

    def _later_fits(self) -> bool:
        """Whether the next read-ahead job may start (the jobs being read stay under the limit)."""
        if not self._later:
            return False
        limit, busy = self.later_limit, self._reading_bytes
        return not limit or not busy or busy + self._later[0][2] <= limit

    def _next(self) -> tuple[_Record, int, int] | None:
        """The next job (record, offset, length), its record given a staging buffer (holding the
        permit the caller took)."""
        with self._work:
            while not self._urgent and not self._later_fits():
                if self._closed:
                    return None
                self._work.wait()
            job = self._urgent.popleft() if self._urgent else self._later.popleft()
            self._reading_bytes += job[2]
            record = job[0]
            if record.reads.plan.scatter:  # read by this thread into its own padding buffer: no staging
                self._permits.release()
            elif record.buffer is None:
                size = max(PAGE, record.reads.plan.staging_bytes)
                pool = self._buffers.get(size)
                record.buffer = pool.pop() if pool else mmap.mmap(-1, size)  # anonymous: page aligned
            else:
                self._permits.release()  # a later chunk: its record already holds one
            return job

    def _read_done(self, length: int) -> None:
        with self._work:
            self._reading_bytes -= length
            if self._later:
                self._work.notify()  # a read-ahead held back by the limit may start

    def _serve(self) -> None:
        padding: dict[int, mmap.mmap] = {}  # this thread's buffers for scattered records' padding, by size
        while True:
            self._permits.acquire()
            job = self._next()
            if job is None:
                self._permits.release()
                return
            record, offset, length = job
            plan = record.reads.plan
            if plan.scatter:  # one read straight into the slot, checked here: no hand-off, no staging
                size = max(PAGE, plan.staging_bytes)
                if size not in padding:
                    padding[size] = mmap.mmap(-1, size)
                record.buffer = padding[size]
                self._read(record, offset, length)
                self._read_done(length)
                self._land(record)
                continue
            self._read(record, offset, length)
            self._read_done(length)
            with self._lock:
                record.chunks_left -= 1
                last = record.chunks_left == 0
            if last:
                with self._land_work:
                    self._landing.append(record)
                    self._land_work.notify()

    def _read(self, record: _Record, offset: int, length: int) -> None:
        """One preadv of a record's chunk; a failure marks the record and is handed to its waiter."""
        reads, plan = record.reads, record.reads.plan
        try:
            if not record.failed:
                views = self._pieces(record) if plan.scatter else [memoryview(record.buffer)[offset : offset + length]]
                got = os.preadv(plan.fd, views, plan.offsets[record.expert] + offset)
                if got != length:
                    raise short_read(plan, record.expert, offset + got)
        except OSError as e:  # EIO, a file gone from under us: this record is lost (DATA_LOSS)
            record.failed = True
            reads.error = reads.error or lost(plan, record.expert, e.strerror)
        except Exception as e:  # noqa: BLE001 - handed to the waiter, which raises it
            record.failed = True
            reads.error = reads.error or e

    def _land_loop(self) -> None:
        while True:
            with self._land_work:
                while not self._landing:
                    if self._closed:
                        return
                    self._land_work.wait()
                record = self._landing.popleft()
            self._land(record)
            self._permits.release()

    @staticmethod
    def _pieces(record: _Record) -> list[memoryview]:
        """The whole record as page-aligned pieces in file order: each tensor's slab row, padding into staging."""
        plan, staging = record.reads.plan, memoryview(record.buffer)
        pieces, used = [], 0
        for _, length, rows in plan.layout:
            if rows is None:
                pieces.append(staging[used : used + length])
                used += length
            else:
                pieces.append(memoryview(rows[record.slot]))
        return pieces

    def _land(self, record: _Record) -> None:
        """All chunks read: verify, copy the tensors into the slot, give the buffer back, count the record."""
        reads, plan = record.reads, record.reads.plan
        buffer = record.buffer
        try:
            if not record.failed:
                if plan.checksums is not None and _record_checksum(record) != plan.checksums[record.expert]:
                    raise mismatch(plan, record.expert)
                if not plan.scatter:
                    source = _address(buffer)
                    for offset, nbytes, rows in plan.tensors:
                        ctypes.memmove(rows[record.slot].ctypes.data, source + offset, nbytes)
        except Exception as e:  # noqa: BLE001
            reads.error = reads.error or e
        if not plan.scatter:  # a scattered record's padding buffer is its reader thread's own
            with self._lock:
                pool = self._buffers.setdefault(len(buffer), [])
                if len(pool) < 2 * len(self._threads):
                    pool.append(buffer)
        record.buffer = None
        with self.landed:
            reads.left -= 1
            if reads.left == 0:
                reads.finished = time.perf_counter()
                self.landed.notify_all()

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()  # reads in flight finish first
        with self._work:
            self._closed = True
            dropped = {id(job[0]): job[0] for job in (*self._urgent, *self._later)}  # never to be landed
            self._urgent.clear()
            self._later.clear()
            self._work.notify_all()
        with self.landed:  # their waiters are told, as the AIO reader's are, instead of waiting for good
            for record in dropped.values():
                record.reads.error = record.reads.error or RuntimeError("read queue is closed")
                record.reads.left -= 1
            self.landed.notify_all()
        for t in self._threads:
            t.join()
        with self._land_work:
            self._land_work.notify_all()
        for t in self._landers:
            t.join()


def _address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


PAGE = 4096


def _record_checksum(record: _Record) -> str:
    plan = record.reads.plan
    if not plan.scatter:
        return checksum(record.buffer)
    h = xxhash.xxh3_64()
    for piece in ReadQueue._pieces(record):
        h.update(piece)
    return h.hexdigest()
