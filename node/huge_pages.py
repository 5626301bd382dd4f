"""Transparent huge pages under the cache's slabs (Linux): each record lands in fewer, larger pages.

A record read straight into a slab slot reaches the disk as one segment per 4 KiB page unless the
memory under it is a huge page. On a virtual disk the host handles each segment, and reads of 96 KiB
records into huge pages ran 1.2-1.45x as fast as into 4 KiB pages on this project's VM
(docs/benchmarks.md, "Huge pages under the slabs"). MLX allocates a slab and fills it with zeros;
the part of it that whole huge pages cover is advised MADV_HUGEPAGE and its pages are dropped
(MADV_DONTNEED: private anonymous memory reads as zeros again), so the first write to each huge
page faults in one. Where the kernel has none to give it falls back to 4 KiB pages; off Linux,
or where the kernel has no transparent huge pages, nothing is advised.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

PMD_SIZE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # "always [madvise] never": the choice bracketed


@cache
def huge_page_bytes() -> int:
    """The kernel's transparent huge page size (2 MiB on x86-64), 0 where it has none or they are
    turned off ("[never]": advising would only drop pages that mx.zeros had already faulted in)."""
    if sys.platform != "linux":
        return 0
    try:
        return 0 if "[never]" in ENABLED.read_text() else int(PMD_SIZE.read_text())
    except (OSError, ValueError):
        return 0


def advise_huge_pages(address: int, nbytes: int, *, huge: bool = True) -> tuple[int, int] | None:
    """Back the huge-page-aligned part of [address, address + nbytes) with huge pages from its next
    fault, or with `huge=False` with 4 KiB pages (MLX reuses freed buffers, advice and pages with them:
    an A/B needs both said). The range must hold zeros and no one else's bytes. The advised (start,
    end), or None."""
    size = huge_page_bytes()
    if not size:
        return None
    start, end = -(-address // size) * size, (address + nbytes) // size * size
    if end <= start:
        return None
    libc = _libc()
    for advice in (mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE, mmap.MADV_DONTNEED):
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice) != 0:
            _note_once(f"no huge pages under the cache (madvise: {ctypes.get_errno()}): records land in 4 KiB pages")
            return None
    return start, end


def resident_huge_bytes(ranges: list[tuple[int, int]]) -> int:
    """Bytes of `ranges` (advised ones) that huge pages back now, from /proc/self/smaps. madvise made
    each range its own mappings (adjacent advised ranges may share one), which are counted whole."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if not merged:
        return 0
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = any(start <= lo and hi <= end for start, end in merged)
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@cache
def _note_once(message: str) -> None:
    log.info(message)
