"""Records read through Linux AIO (node/_aio_reads.c): the read queue's path for O_DIRECT records.

The compiled part keeps `depth` reads in flight with io_submit, checks each record's xxh3 on its
own POSIX thread and wakes the waiter once per batch, so that no Python runs per record (Python
reader threads cap 96 KiB records near 11 k/s, fio reads ~20 k/s). It is built by `pip install`
where it can be (Linux, a C compiler, xxhash.h); elsewhere `open_ring` says so and the read
queue's reader threads read instead.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from functools import cache
from typing import Protocol

from flashmesh.node.record_plan import RecordPlan, lost, mismatch, short_read

try:
    from flashmesh.node import _aio_reads
except ImportError:  # not built here: see setup.py
    _aio_reads = None

log = logging.getLogger(__name__)


class Batch(Protocol):
    """One submit's records (node/_aio_reads.c)."""

    seconds: float  # submission to the last record done (0 until then)

    def wait(self) -> None:
        """Block, without the GIL, until every record is done."""

    def done(self) -> bool: ...

    def failures(self) -> list[tuple[int, int, int]]:
        """(index, status, bytes read) of each failed record: errno > 0, or SHORT_READ, MISMATCH,
        CANCELLED, DROPPED."""
        ...

    def drop(self) -> bool:
        """If none of its records was submitted yet, finish them all unread (DROPPED) and say so."""
        ...


class Ring(Protocol):
    """`depth` O_DIRECT reads in flight through Linux AIO (node/_aio_reads.c); a read-ahead (not
    urgent) starts only while the reads in flight hold less than `later_limit` bytes with it, or
    none are in flight."""

    def submit(self, fd: int, records: list[tuple[int, list[tuple[int, int]], int | None]], urgent: bool) -> Batch:
        """Queue (offset, [(address, or 0 for padding, length)], xxh3 or None) records, in order."""
        ...

    def promote(self, batch: Batch) -> None:
        """Move `batch`'s records that wait behind read-aheads to the front."""

    def close(self) -> None:
        """Cancel what is queued, finish what is in flight, stop the reaper."""


def open_ring(depth: int, *, later_limit: int = 0) -> Ring | None:
    """An AIO ring keeping `depth` reads in flight, read-aheads starting only below `later_limit`
    bytes in flight (0: no limit), or None where there is none (logged once)."""
    if _aio_reads is None:
        _note_once("the compiled AIO reader is not built here; Python reader threads read records")
        return None
    try:
        return _aio_reads.Ring(depth, later_limit)
    except OSError as e:  # io_setup refused (aio-max-nr reached, a sandbox without AIO)
        _note_once(f"Linux AIO unavailable ({e.strerror}); Python reader threads read records")
        return None


@cache
def _note_once(message: str) -> None:
    log.info(message)


def takes_aio(fd: int) -> bool:
    """Whether reads of `fd` are asynchronous under AIO: only O_DIRECT ones are (else io_submit blocks)."""
    return bool(getattr(os, "O_DIRECT", 0)) and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


class AioReads:
    """The records of one layer read into reserved slab slots through a ring; `wait()` on the caller."""

    def __init__(self, ring: Ring, plan: RecordPlan, slots: dict[int, int], *, urgent: bool) -> None:
        self.ring, self.plan, self.slots = ring, plan, slots
        self.layer = plan.layer
        self.experts = list(slots)
        checksums = plan.checksum_values
        records = [
            (
                plan.offsets[e],
                [(base + slot * stride if base else 0, length) for base, stride, length in plan.pieces],
                checksums[e] if checksums else None,
            )
            for e, slot in slots.items()
        ]
        self.started = time.perf_counter()
        self._batch = ring.submit(plan.fd, records, urgent)

    def done(self) -> bool:
        return self._batch.done()

    def drop(self) -> bool:
        """Finish unread if none of its records was submitted yet; say whether."""
        return self._batch.drop()

    @property
    def seconds(self) -> float:
        """Submission to the last record read and checked."""
        return self._batch.seconds

    def wait(self) -> dict[int, int]:
        """Block (without the GIL) until every record is in its slot; raise the first failure."""
        if not self._batch.done():
            self.ring.promote(self._batch)
            self._batch.wait()
        failures = self._batch.failures()
        if failures:
            index, status, got = failures[0]
            plan, expert = self.plan, self.experts[index]
            if status == _aio_reads.SHORT_READ:
                raise short_read(plan, expert, got)
            if status == _aio_reads.MISMATCH:
                raise mismatch(plan, expert)
            if status == _aio_reads.CANCELLED:
                raise RuntimeError("read queue is closed")
            if status == _aio_reads.DROPPED:
                raise RuntimeError("these reads were dropped before they started")
            raise lost(plan, expert, os.strerror(status))
        return self.slots
