"""How long the flash had reads in flight: the union of every load's [submitted, landed] span.

The sum of loads' own times counts overlapping reads twice, and the time a caller waited leaves out
reads that ran under compute; the union is what says whether the flash was kept busy (and so the
rate it read at while busy, bytes over busy seconds).
"""

from __future__ import annotations

import bisect


class BusyTime:
    """Spans are added as loads land, in any order. Those that end before every load still in
    flight began can no longer grow; they are summed and dropped, so the list stays short."""

    def __init__(self) -> None:
        self._folded = 0.0
        self._spans: list[tuple[float, float]] = []  # disjoint, in order

    @property
    def seconds(self) -> float:
        return self._folded + sum(end - start for start, end in self._spans)

    def add(self, start: float, end: float, *, in_flight_since: float | None) -> None:
        """One landed load's span; `in_flight_since`: the earliest start of the loads still in
        flight (None when there are none)."""
        spans = self._spans
        lo = hi = bisect.bisect_left(spans, (start, end))
        if lo > 0 and spans[lo - 1][1] >= start:  # overlaps the span before it
            lo -= 1
        while hi < len(spans) and spans[hi][0] <= end:  # and those after it that it reaches
            hi += 1
        if lo < hi:
            start, end = min(start, spans[lo][0]), max(end, spans[hi - 1][1])
        spans[lo:hi] = [(start, end)]
        horizon = float("inf") if in_flight_since is None else in_flight_since
        done = 0
        while done < len(spans) and spans[done][1] <= horizon:
            done += 1
        self._folded += sum(e - s for s, e in spans[:done])
        del spans[:done]
