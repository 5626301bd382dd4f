"""The cache's load path: records land in slab slots byte for byte (read straight into the slot or
copied from staging), corrupt, truncated and unreadable records are refused, full slabs fill in and
go lazy on views."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import sysconfig

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node import aio_reads, read_queue
from flashmesh.node.cache import ExpertCache
from flashmesh.node.store_format import Manifest, RecordError
from flashmesh.node.store_reader import ExpertStore

PROMPT = "The quick brown fox jumps over the lazy dog. Mixture of experts"
BUILT = aio_reads._aio_reads is not None
READERS = [pytest.param(True, id="aio"), pytest.param(False, id="threads")]


def test_the_aio_reader_is_built_where_it_can_be():
    """`pip install` builds node/_aio_reads.c on Linux with a C compiler and xxhash.h (setup.py)."""
    python_h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not sys.platform.startswith("linux") or not all(
        (shutil.which("cc"), os.path.exists("/usr/include/xxhash.h"), os.path.exists(python_h))
    ):
        pytest.skip("the AIO reader builds on Linux with cc, Python.h and xxhash.h (libxxhash-dev)")
    assert BUILT, "node/_aio_reads.c did not build: re-run `make test` and read pip's compiler output"


def _copied_store(models, tmp_path):
    """A copy of the test store to damage, and its first layer."""
    _, src = models.get("qwen3_moe")
    path = tmp_path / "store"
    shutil.copytree(src, path)
    return path, Manifest.load(path).layers[0]


def _store(path, aio: bool) -> ExpertStore:
    store = ExpertStore(path, aio=aio)
    if aio and BUILT:  # the reads under test go through the ring (the test stores are on a disk, O_DIRECT)
        assert store.bypassing_cache and store._queue.ring is not None
    elif aio:
        pytest.skip("the AIO reader is not built here")
    return store


@pytest.mark.parametrize("aio", READERS)
@pytest.mark.parametrize("quant,scatter", [("fp32", True), ("affine4", False)])
def test_load_lands_records_in_their_slots(models, quant, scatter, aio):
    _, path = models.get("qwen3_moe", quant)
    with _store(path, aio) as store:
        cache = ExpertCache(store, budget_bytes=store.manifest.min_budget_bytes * 2)
        spec = store.manifest.layers[1]
        slab = cache.slab(spec.layer)
        slots = {e: slab.take((spec.layer, e)) for e in spec.experts[:3]}
        reads = store.load(spec.layer, slots, slab, urgent=False)
        assert reads.plan.scatter is scatter  # fp32 tensors are whole pages; 4-bit scales are not
        assert isinstance(reads, aio_reads.AioReads) is (aio and scatter)  # the ring takes scattered records
        assert store.reader == ("aio" if aio and scatter else "threads")  # what the run's JSON says
        assert reads.wait() == slots
        for e, slot in slots.items():
            raw = store.read_raw(spec.layer, e)
            for t in spec.tensors:
                assert slab.rows[t.name][slot].tobytes() == raw[t.offset : t.offset + t.nbytes]


@pytest.mark.parametrize("aio", READERS)
def test_a_corrupt_record_is_refused_by_either_path(models, tmp_path, aio):
    path, spec = _copied_store(models, tmp_path)
    with open(path / spec.file, "r+b") as f:
        f.seek(spec.record_offset(2) + spec.tensors[-1].offset + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with _store(path, aio) as store:
        cache = ExpertCache(store, budget_bytes=store.manifest.min_budget_bytes)
        with pytest.raises(RecordError, match=f"layer {spec.layer} expert 2"):
            cache.acquire(spec.layer, [1, 2])
        assert cache.bytes == 0 and not cache._pinned  # room and pins given back
        cache.acquire(spec.layer, [1, 3])  # the others still load


@pytest.mark.parametrize("aio", READERS)
def test_a_truncated_store_file_is_a_short_read_of_its_records(models, tmp_path, aio):
    path, spec = _copied_store(models, tmp_path)
    last = spec.experts[-1]
    with _store(path, aio) as store:
        with open(path / spec.file, "r+b") as f:  # cut short under the open store (a full disk, a bad copy)
            f.truncate(spec.record_offset(last) + spec.record_size // 2)
        cache = ExpertCache(store, budget_bytes=store.manifest.min_budget_bytes)
        with pytest.raises(RecordError, match=f"expert {last}: short read"):
            cache.acquire(spec.layer, [last])
        cache.acquire(spec.layer, [spec.experts[0]])


def test_an_unreadable_record_is_lost(models, monkeypatch):
    """EIO from the disk, here without a loop device (test_storage_faults fails a real one under a node)."""
    _, path = models.get("qwen3_moe")

    def failing(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    with ExpertStore(path, aio=False) as store:
        monkeypatch.setattr(read_queue.os, "preadv", failing)
        cache = ExpertCache(store, budget_bytes=store.manifest.min_budget_bytes)
        spec = store.manifest.layers[0]
        with pytest.raises(RecordError, match=r"cannot read .*Input/output error"):
            cache.acquire(spec.layer, [spec.experts[0]])


def test_an_unreadable_record_is_lost_under_aio(models, tmp_path):
    """The kernel's refusal of a read comes back as the record's loss: here EBADF from io_submit, a
    write-only O_DIRECT descriptor put where the layer file's was (a real EIO needs a failing disk:
    test_storage_faults)."""
    _, path = models.get("qwen3_moe")
    with _store(path, True) as store:
        spec = store.manifest.layers[0]
        write_only = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        os.dup2(write_only, store._fds[spec.layer])
        os.close(write_only)
        assert aio_reads.takes_aio(store._fds[spec.layer])  # so the ring, not a thread, reads it
        cache = ExpertCache(store, budget_bytes=store.manifest.min_budget_bytes)
        with pytest.raises(RecordError, match=rf"expert {spec.experts[1]}: cannot read .*\(Bad file descriptor\)"):
            cache.acquire(spec.layer, [spec.experts[1]])
        assert cache.bytes == 0 and not cache._pinned


def test_full_budget_fills_in_and_goes_lazy_on_views(models):
    src, store = models.get("qwen3_moe")
    from mlx_lm import load

    ref_model, tokenizer = load(str(src))
    prompt = tokenizer.encode(PROMPT)
    reference = generate(ref_model, tokenizer, prompt, SamplingParams(max_tokens=8))
    manifest = Manifest.load(store)
    streaming = open_model(ModelOptions(store=store, ram_budget=manifest.expert_bytes_total))  # no preload
    try:
        assert (
            generate(streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=8)).tokens
            == reference.tokens
        )
        streaming.cache.drain()
        stats = streaming.cache.stats
        assert stats.misses > 0 and stats.filled > 0
        assert stats.bytes_read == sum(len(s.experts) * s.record_size for s in manifest.layers)  # each once
        spec = manifest.layers[0]
        view = streaming.cache.resident_view(spec.layer)
        assert view is not None  # every expert resident: the layer runs on mlx-lm's own stacked arrays
        module = ref_model.model.layers[spec.layer].mlp.switch_mlp
        for name, array in view.items():
            owner, leaf = name.rsplit(".", 1)
            assert mx.array_equal(array, getattr(getattr(module, owner), leaf)).item()
        slab = streaming.cache.slab(spec.layer)
        name = spec.tensors[0].name
        base = np.array(slab.arrays[name], copy=False).ctypes.data
        assert np.array(view[name], copy=False).ctypes.data >= base  # a view of the slab, not a copy
        assert (
            generate(streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=8)).tokens
            == reference.tokens
        )
        assert streaming.cache.stats.misses == stats.misses  # second run: all lazy, no reads
    finally:
        streaming.close()


@pytest.mark.parametrize("aio", READERS)
def test_closing_cancels_what_is_queued_and_finishes_what_is_in_flight(models, aio):
    _, path = models.get("qwen3_moe")
    store = _store(path, aio)
    spec = store.manifest.layers[0]
    cache = ExpertCache(store, budget_bytes=store.manifest.expert_bytes_total)
    slab = cache.slab(spec.layer)
    loads = [store.load(spec.layer, {e: slab.take((spec.layer, e))}, slab, urgent=False) for e in spec.experts]
    store.close()  # reads in flight finish, the rest never start
    outcomes = []
    for load in loads:
        assert load.done()
        try:
            load.wait()
            outcomes.append("landed")
        except RuntimeError as e:
            assert "read queue is closed" in str(e)
            outcomes.append("cancelled")
    if aio:
        assert outcomes[0] == "landed"  # in the kernel at once (a reader thread may not have taken it yet)
    assert set(outcomes) <= {"landed", "cancelled"}


@pytest.mark.parametrize("aio", READERS)
def test_a_read_ahead_not_yet_started_can_be_dropped(models, aio):
    """Read-aheads being read hold at most `read_ahead_bytes` (one record at least): with a limit of
    one byte they go one at a time, so the last of many has not started and can be taken back."""
    _, path = models.get("qwen3_moe")
    store = ExpertStore(path, aio=aio, read_ahead_bytes=1)
    if aio and not (BUILT and store._queue.ring is not None):
        store.close()
        pytest.skip("the AIO reader is not built here")
    with store:
        spec = store.manifest.layers[0]
        cache = ExpertCache(store, budget_bytes=store.manifest.expert_bytes_total)
        slab = cache.slab(spec.layer)
        slots = [{e: slab.take((spec.layer, e))} for e in spec.experts]
        loads = [store.load(spec.layer, s, slab, urgent=False) for s in slots]
        if aio:  # in the kernel at once: the limit lets one record through (a thread may not have taken it yet)
            assert not loads[0].drop()
        assert loads[-1].drop()  # behind all the others, one at a time
        assert loads[-1].done()
        with pytest.raises(RuntimeError, match="dropped"):
            loads[-1].wait()
        for load in loads[:-1]:
            ((e, slot),) = load.wait().items()
            raw = store.read_raw(spec.layer, e)
            for t in spec.tensors:
                assert slab.rows[t.name][slot].tobytes() == raw[t.offset : t.offset + t.nbytes]
            assert not load.drop()  # landed: nothing to take back


def _read_ahead_behind_demand(store: ExpertStore) -> tuple[bool, bool]:
    """Every layer's records but the last's as demand reads, then one read-ahead: whether demand
    reads were still in flight when it was looked at, and whether it could be taken back."""
    layers = store.manifest.layers
    cache = ExpertCache(store, budget_bytes=store.manifest.expert_bytes_total)
    demand = []
    for spec in layers[:-1]:
        slab = cache.slab(spec.layer)
        demand.append(store.load(spec.layer, {e: slab.take((spec.layer, e)) for e in spec.experts}, slab, urgent=True))
    last, slab = layers[-1], cache.slab(layers[-1].layer)
    ahead = store.load(last.layer, {last.experts[0]: slab.take((last.layer, last.experts[0]))}, slab, urgent=False)
    reading = not all(load.done() for load in demand)
    dropped = ahead.drop()
    for load in demand:
        load.wait()
    if not dropped:
        ahead.wait()
    return reading, dropped


@pytest.mark.parametrize("aio", READERS)
def test_a_read_ahead_waits_for_the_demand_reads_in_flight(models, aio):
    """A read-ahead starts only while all reads in flight, demand reads too, hold less than
    `read_ahead_bytes`: queued behind demand reads, it is still queued (so it can be taken back)
    while they read, though the queue has depth to spare for it."""
    _, path = models.get("qwen3_moe")
    manifest = Manifest.load(path)
    demand_records = sum(len(spec.experts) for spec in manifest.layers[:-1])
    store = ExpertStore(path, aio=aio, queue_depth=demand_records + 8, read_ahead_bytes=1)
    if aio and not (BUILT and store._queue.ring is not None):
        store.close()
        pytest.skip("the AIO reader is not built here")
    with store:
        for _ in range(5):  # the demand reads may all land before the read-ahead is looked at: again
            reading, dropped = _read_ahead_behind_demand(store)
            if reading:
                break
        assert reading, "the demand reads kept landing before the read-ahead could be looked at"
        assert dropped
