"""The disk's own timeline of a run: block-layer tracepoints (Linux tracefs, root).

The cache's busy time comes from its loads' spans (submitted to checked and woken), which also
count hashing and wake-ups, and /sys/block's io_ticks counts in whole jiffies, so that many short
idle gaps read as busy. The block layer's issue and complete events time the disk itself, on the
clock perf_counter reads (CLOCK_MONOTONIC), so a run's own window says how long the disk had reads
in flight and the rate it read at meanwhile: the read time of that run's bytes at its own minute's
rate, which drifts here from minute to minute.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flashmesh.protos.errors import UserError

from bench.scaling import disk_of

log = logging.getLogger(__name__)

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("block/block_rq_issue", "block/block_rq_complete")
# "block_rq_issue: 254,0 R 4096 () 8851208 + 8 ..." / "block_rq_complete: 254,0 R () 8851208 + 8 ..."
_LINE = re.compile(r"\s(\d+\.\d+): block_rq_(issue|complete): (\d+),(\d+) (\S+)(?: \d+)? \(\) (\d+) \+ (\d+)")
_SECTOR = 512


@dataclass(frozen=True)
class DiskWindow:
    seconds: float  # the window's length
    busy_seconds: float  # with at least one read in flight on the disk
    bytes_read: int  # of reads completed in the window

    @property
    def busy_fraction(self) -> float:
        return self.busy_seconds / self.seconds if self.seconds else 0.0

    @property
    def gbps_while_busy(self) -> float:
        return self.bytes_read / self.busy_seconds / 1e9 if self.busy_seconds else 0.0


def unavailable(path: Path) -> str | None:
    """Why the disk under `path` cannot be traced here, or None when it can."""
    if not os.path.exists("/sys/dev/block"):
        return "not Linux"
    if os.geteuid() != 0:
        return "tracing the block layer needs root"
    if not (TRACEFS / "events" / EVENTS[0]).exists():
        return f"no block tracepoints under {TRACEFS} (mount -t tracefs nodev {TRACEFS})"
    try:
        disk_of(path)
    except UserError as e:
        return str(e)
    return None


class BlockTrace:
    """Trace the disk holding `path` between __enter__ and __exit__; then `window(start, end)`."""

    def __init__(self, path: Path) -> None:
        self.disk = tuple(map(int, disk_of(path).split(":")))  # (major, minor) as traced
        self._busy: list[tuple[float, float]] = []  # the disk's busy spans, in order
        self._completed: list[tuple[float, int]] = []  # (time, bytes) of each read completed

    def _write(self, name: str, value: str) -> None:
        (TRACEFS / name).write_text(value)

    def __enter__(self) -> BlockTrace:
        self._write("tracing_on", "0")
        self._write("trace_clock", "mono")
        self._write("buffer_size_kb", "16384")  # per CPU; a request is two ~100-byte lines
        self._write("trace", "")
        for event in EVENTS:
            self._write(f"events/{event}/enable", "1")
        self._write("tracing_on", "1")
        return self

    def __exit__(self, *exc) -> None:
        self._write("tracing_on", "0")
        try:
            with open(TRACEFS / "trace") as lines:
                self._parse(lines)
        finally:
            for event in EVENTS:
                self._write(f"events/{event}/enable", "0")
            self._write("trace", "")

    def _parse(self, lines) -> None:
        # Requests are keyed by their first sector: a request the driver could not take is requeued
        # and issued again (a second issue event, one completion).
        in_flight: set[int] = set()
        since = 0.0
        for line in lines:
            m = _LINE.search(line)
            if not m or (int(m[3]), int(m[4])) != self.disk or "R" not in m[5]:
                continue
            t, sector = float(m[1]), int(m[6])
            if m[2] == "issue":
                if not in_flight:
                    since = t
                in_flight.add(sector)
            elif sector in in_flight:  # a request issued before tracing began is left out
                in_flight.discard(sector)
                self._completed.append((t, int(m[7]) * _SECTOR))
                if not in_flight:
                    self._busy.append((since, t))

    def window(self, start: float, end: float) -> DiskWindow:
        """The disk between two perf_counter() readings (of any process on this machine)."""
        busy = sum(max(0.0, min(end, b) - max(start, a)) for a, b in self._busy)
        read = sum(n for t, n in self._completed if start <= t <= end)
        return DiskWindow(seconds=end - start, busy_seconds=busy, bytes_read=read)


def trace_if_possible(path: Path) -> BlockTrace | None:
    """A BlockTrace of the disk under `path`, or None (logged) where the block layer cannot be traced."""
    why = unavailable(path)
    if why:
        log.warning("the disk's own timeline is left out: %s", why)
        return None
    return BlockTrace(path)
