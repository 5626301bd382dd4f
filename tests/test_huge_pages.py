"""Slabs in transparent huge pages (node/huge_pages.py): still zeros when made, faulted in as huge pages
as records land, and records read into them byte for byte by either reader."""

from __future__ import annotations

import numpy as np
import pytest
from flashmesh.node import huge_pages
from flashmesh.node.slab import Slab
from flashmesh.node.store_reader import ExpertStore

from .test_read_queue import READERS, _store

needs_thp = pytest.mark.skipif(not huge_pages.huge_page_bytes(), reason="no transparent huge pages (Linux only)")


def _big_slab(spec, *, huge: bool = True, megabytes: int = 8) -> Slab:
    """A slab whose every tensor array spans `megabytes`: whole huge pages fit inside each."""
    return Slab([spec], slots=megabytes * 2**20 // min(t.nbytes for t in spec.tensors), huge_pages=huge)


@needs_thp
def test_a_slab_is_advised_and_still_zeros(models):
    _, path = models.get("qwen3_moe")
    with ExpertStore(path) as store:
        spec = store.manifest.layers[0]
    slab = _big_slab(spec)
    size = huge_pages.huge_page_bytes()
    assert len(slab.huge_ranges) == len(spec.tensors)
    for (start, end), rows in zip(slab.huge_ranges, slab.rows.values(), strict=True):
        assert rows.ctypes.data <= start < end <= rows.ctypes.data + rows.nbytes
        assert start % size == 0 and end % size == 0 and end - start >= rows.nbytes - 2 * size
        assert not rows.any()  # the dropped pages read as zeros, as mx.zeros made them
    for rows in slab.rows.values():
        rows[:] = 7
    assert slab.huge_page_bytes() > 0  # written: faulted in as huge pages
    assert all((rows == 7).all() for rows in slab.rows.values())
    del slab  # MLX may hand its memory, advice and huge pages with it, to the next slab
    small = _big_slab(spec, huge=False)
    assert small.huge_ranges == []
    for rows in small.rows.values():
        rows[:] = 7
    whole = [(r.ctypes.data, r.ctypes.data + r.nbytes) for r in small.rows.values()]
    assert huge_pages.resident_huge_bytes(whole) == 0  # 4 KiB pages, as asked (the A/B of bench io --pages)


@needs_thp
@pytest.mark.parametrize("aio", READERS)
def test_records_land_in_huge_pages_byte_for_byte(models, aio):
    _, path = models.get("qwen3_moe")
    with _store(path, aio) as store:
        spec = store.manifest.layers[1]
        slab = _big_slab(spec)
        for rows in slab.rows.values():
            rows[:] = 0  # faulted in before the reads, as bench io does
        spread = np.linspace(slab.slots // 4, slab.slots - 1, len(spec.experts)).astype(int)
        slots = {e: int(s) for e, s in zip(spec.experts, spread, strict=True)}
        assert store.load(spec.layer, slots, slab, urgent=True).wait() == slots
        for e, slot in slots.items():
            raw = store.read_raw(spec.layer, e)
            for t in spec.tensors:
                assert slab.rows[t.name][slot].tobytes() == raw[t.offset : t.offset + t.nbytes]
        assert slab.huge_page_bytes() > 0


def test_no_huge_pages_reaches_a_nodes_cache(models):
    """`node serve --no-huge-pages` (run and serve: tests/test_options.py)."""
    from flashmesh.coordinator.cli import build_parser
    from flashmesh.node.service import NodeService

    _, path = models.get("qwen3_moe")
    assert build_parser().parse_args(["node", "serve", str(path), "--no-huge-pages"]).huge_pages is False
    service = NodeService(path, ram_budget=2**30, token="t", huge_pages=False)
    try:
        assert not any(service.cache.slab(s.layer).huge_pages for s in service.manifest.layers)
    finally:
        service.close()


@pytest.fixture
def kernel(monkeypatch, tmp_path):
    """Point huge_pages at a fake /sys: kernel(enabled line, hpage_pmd_size or None)."""

    def set_to(enabled: str, pmd: str | None) -> None:
        (tmp_path / "enabled").write_text(enabled + "\n")
        if pmd is not None:
            (tmp_path / "pmd").write_text(pmd + "\n")
        monkeypatch.setattr(huge_pages, "ENABLED", tmp_path / "enabled")
        monkeypatch.setattr(huge_pages, "PMD_SIZE", tmp_path / "pmd")
        monkeypatch.setattr(huge_pages.sys, "platform", "linux")
        huge_pages.huge_page_bytes.cache_clear()

    yield set_to
    huge_pages.huge_page_bytes.cache_clear()  # the real kernel's answer again, once monkeypatch undoes


@pytest.mark.parametrize("enabled,pmd", [("always [madvise] never", None), ("always madvise [never]", "2097152")])
def test_without_transparent_huge_pages_nothing_is_advised(kernel, enabled, pmd):
    """A kernel without THP (no hpage_pmd_size), or with them turned off."""
    kernel(enabled, pmd)
    assert huge_pages.huge_page_bytes() == 0
    assert huge_pages.advise_huge_pages(1 << 30, 64 << 20) is None


def test_the_huge_page_size_is_the_kernels(kernel):
    kernel("always [madvise] never", "2097152")
    assert huge_pages.huge_page_bytes() == 2 << 20


def test_resident_bytes_count_only_mappings_inside_the_ranges():
    assert huge_pages.resident_huge_bytes([]) == 0
    assert huge_pages.resident_huge_bytes([(0, 4096)]) == 0  # no mapping of this process lies there
