"""The benchmarks' own tools that decide what is compared: the GGUF llama.cpp reads, the disk blkio caps, and
the hit rate plan-validate's calibration predicts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from flashmesh.node.store_format import Manifest
from safetensors.numpy import load_file

from bench.gguf_export import export_gguf
from bench.plan_runs import counted_hit_rate
from bench.scaling import disk_of


def test_gguf_holds_the_same_weights_and_bytes_per_expert(models, tmp_path):
    import gguf

    src, store = models.get("qwen3_moe")
    out = export_gguf(src, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(out))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen3moe"
    tensors = {t.name: t for t in reader.tensors}
    weights = load_file(str(src / "model.safetensors"))
    assert len(tensors) == len(weights)
    manifest = Manifest.load(store)
    experts = manifest.layers[0].num_experts
    per_expert = sum(tensors[f"blk.0.ffn_{p}_exps.weight"].n_bytes for p in ("gate", "up", "down")) // experts
    assert per_expert == manifest.layers[0].payload_bytes  # llama.cpp reads what our store reads, per expert
    for name in ("gate", "up", "down"):
        got = np.asarray(tensors[f"blk.1.ffn_{name}_exps.weight"].data)
        np.testing.assert_array_equal(got, weights[f"model.layers.1.mlp.switch_mlp.{name}_proj.weight"])
    np.testing.assert_array_equal(np.asarray(tensors["token_embd.weight"].data), weights["model.embed_tokens.weight"])
    vocab = reader.fields["tokenizer.ggml.tokens"]
    assert len(vocab.data) == weights["model.embed_tokens.weight"].shape[0]
    assert not list(tmp_path.glob(".*partial*"))


def test_gguf_export_names_what_it_cannot_write(models, tmp_path):
    src, _ = models.get("mixtral")
    with pytest.raises(ValueError, match="qwen3_moe only"):
        export_gguf(src, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_blkio_caps_the_whole_disk_under_a_path(tmp_path):
    majmin = disk_of(tmp_path)
    assert re.fullmatch(r"\d+:\d+", majmin)
    sys_dev = Path("/sys/dev/block") / majmin
    assert sys_dev.exists() and not (sys_dev / "partition").exists()
    dev = os.stat(tmp_path).st_dev
    if not (Path("/sys/dev/block") / f"{os.major(dev)}:{os.minor(dev)}" / "partition").exists():
        assert majmin == f"{os.major(dev)}:{os.minor(dev)}"


def test_instruction_dumps_are_read_per_dump_and_thread(tmp_path):
    from bench.instructions import _totals

    for part, thread, count in ((1, 1, 100), (1, 20, 7), (2, 1, 130), (2, 20, 9), (10, 1, 5)):
        (tmp_path / f"cg.42.{part}-{thread:02d}").write_text(f"version: 1\nsummary: {count}\ntotals: {count}\n")
    (tmp_path / "cg.42.3-01").write_text("version: 1\n")  # a dump without a summary line is skipped
    (tmp_path / "cg.43.1-01").write_text("summary: 999\n")  # another process's dump
    assert _totals(tmp_path, 42) == [{1: 100, 20: 7}, {1: 130, 20: 9}, {1: 5}]  # numeric order: 10 after 2


def test_calibration_counts_only_the_generation_after_the_warm_up():
    trace = [(0, [0, 1]), (0, [2, 3]), (0, [0, 1])]
    assert counted_hit_rate(trace, warm=2, capacity=4) == 1.0  # everything the warm-up read is still there
    assert counted_hit_rate(trace, warm=2, capacity=2) == 0.0  # LFU with aging kept the later 2, 3
    assert counted_hit_rate(trace, warm=1, capacity=4) == 0.5  # [2, 3] cold, [0, 1] hits


def test_block_trace_times_the_disks_own_busy_spans():
    """The disk's timeline from block tracepoint lines: busy while any read of this disk is in flight,
    bytes of the reads completed in the window; a requeued request issued twice counts once; other
    disks, writes and reads issued before tracing are left out."""
    from bench.block_trace import BlockTrace

    trace = BlockTrace.__new__(BlockTrace)
    trace.disk, trace._busy, trace._completed = (254, 0), [], []
    lines = [
        "  <idle>-0 [001] ..s1. 9.500000: block_rq_complete: 254,0 R () 1 + 8 be,0,4 [0]",  # before tracing
        "  python-1 [000] ..... 10.000000: block_rq_issue: 254,0 R 4096 () 8 + 8 be,0,4 [python]",
        "  python-1 [000] ..... 10.001000: block_rq_issue: 254,0 RA 8192 () 64 + 16 be,0,4 [python]",
        "  python-1 [000] ..... 10.001500: block_rq_issue: 254,16 R 4096 () 8 + 8 be,0,4 [python]",  # another disk
        "  python-1 [000] ..... 10.001800: block_rq_issue: 254,0 R 4096 () 8 + 8 be,0,4 [python]",  # requeued
        "  <idle>-0 [001] ..s1. 10.002000: block_rq_complete: 254,0 R () 8 + 8 be,0,4 [0]",
        "  kworker-9 [001] ..... 10.002500: block_rq_issue: 254,0 WS 4096 () 99 + 8 be,0,4 [kworker]",  # a write
        "  <idle>-0 [001] ..s1. 10.004000: block_rq_complete: 254,0 RA () 64 + 16 be,0,4 [0]",
        "  python-1 [000] ..... 10.010000: block_rq_issue: 254,0 R 4096 () 8 + 8 be,0,4 [python]",
        "  <idle>-0 [001] ..s1. 10.011000: block_rq_complete: 254,0 R () 8 + 8 be,0,4 [0]",
    ]
    trace._parse(lines)
    assert trace._busy == [(10.0, 10.004), (10.01, 10.011)]
    whole = trace.window(10.0, 10.02)
    assert whole.busy_seconds == pytest.approx(0.005)
    assert whole.bytes_read == (8 + 16 + 8) * 512
    assert whole.busy_fraction == pytest.approx(0.25)
    assert trace.window(10.003, 10.0105).busy_seconds == pytest.approx(0.0015)  # cut to the window
