"""`flashmesh plan`: model facts from the built model, the hit-rate model, the time model, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flashmesh.coordinator.hit_rate import Routing, hit_rate
from flashmesh.coordinator.model_facts import load_facts
from flashmesh.coordinator.planner import Device, plan
from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import UserError

PUBLISHED = Path(__file__).parents[1] / "bench" / "published"


def flashmesh(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flashmesh.coordinator.cli", *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_facts_agree_with_the_store(models, arch):
    src, store = models.get(arch)
    manifest = Manifest.load(store)
    from_store, from_dir, from_config = (
        load_facts(str(store)),
        load_facts(str(src)),
        load_facts(str(src / "config.json")),
    )
    assert from_store.top_k == from_dir.top_k == from_config.top_k == manifest.top_k
    assert [(s.layer, s.num_experts, s.payload_bytes) for s in from_store.layers] == [
        (s.layer, s.num_experts, s.payload_bytes) for s in manifest.layers
    ]
    assert from_dir.layers == from_store.layers  # computed from the built model = the packed records
    assert from_dir.dense_bytes == from_store.dense_bytes > 0


@pytest.fixture(scope="module")
def qwen35():
    """Qwen3.5-397B-A17B 4-bit run with 4 experts per token, as flash-moe runs it."""
    return load_facts(str(PUBLISHED / "qwen3.5-397b-a17b-4bit.json"), top_k=4)


def test_published_qwen35_facts(qwen35):
    assert (len(qwen35.layers), qwen35.layers[0].num_experts, qwen35.top_k) == (60, 512, 4)
    assert qwen35.layers[0].payload_bytes == 7_077_888  # 6.75 MiB, as flash-moe reports its 4-bit experts
    assert "top-k 4 instead of the model's 10" in qwen35.notes  # the model's own k, found by routing one token


def test_hit_rate_model():
    uniform = Routing.zipf(64, 4, s=0.0)
    for capacity in (32, 64, 128):
        assert hit_rate(uniform, capacity=capacity, top_k=8) == pytest.approx(capacity / 256, abs=0.02)
    skewed = Routing.zipf(64, 4, s=1.1)
    rates = [hit_rate(skewed, capacity=c, top_k=8) for c in (32, 64, 128, 256)]
    assert rates == sorted(rates) and rates[-1] == 1.0 and rates[1] > 64 / 256
    # below one token's k x L records the engine is cyclic: hits come only from token-to-token reuse
    assert hit_rate(uniform, capacity=16, top_k=8) == pytest.approx(16 / 32 * 8 / 64)


def test_time_model(qwen35):
    facts = qwen35
    mac = Device("mac", 48 * 10**9, 6.0, 200.0)
    one = plan(facts, [mac])
    assert one.fits and 0 < one.hit_rate < 1
    assert one.read_bytes_per_token == pytest.approx(facts.active_expert_bytes * (1 - one.hit_rate), rel=1e-6)
    faster = plan(facts, [Device("mac", 48 * 10**9, 12.0, 200.0)])
    assert faster.tokens_per_s > one.tokens_per_s and faster.read_bound_tokens_per_s == pytest.approx(
        2 * one.read_bound_tokens_per_s
    )
    two = plan(facts, [mac, Device("mac2", 48 * 10**9, 6.0, 200.0)])
    assert two.tokens_per_s > one.tokens_per_s and two.network_s > 0
    first, second = two.devices  # the first also holds the dense part: less budget, fewer experts placed
    assert first.assigned_experts + second.assigned_experts == 60 * 512 and first.assigned_experts < 60 * 512 // 2
    phone = plan(facts, [Device("phone", 8 * 10**9, 1.5, 25.0, usable_ram=0.5)])
    assert not phone.fits and "does not fit" in phone.problems[0]


def test_devices_on_one_host_share_it(qwen35):
    from flashmesh.coordinator.planner import effective_rates

    alone = Device("a", 48 * 10**9, 6.0, 200.0, host="mac")
    pair = [alone, Device("b", 48 * 10**9, 6.0, 200.0, host="mac")]
    assert effective_rates([alone]) == [(6.0, 200.0)]  # alone on its host: all of it
    assert effective_rates(pair) == [(3.0, 100.0)] * 2  # unmeasured: an even split
    measured = [Device(n, 48 * 10**9, 6.0, 200.0, host="mac", shared_compute_gbps=150.0, shared_flash_gbps=4.0)
                for n in "ab"]  # fmt: skip
    assert effective_rates(measured) == [(4.0, 150.0)] * 2  # a process alone leaves cores idle
    apart = [Device("a", 48 * 10**9, 6.0, 200.0), Device("b", 48 * 10**9, 6.0, 200.0)]
    assert effective_rates(apart) == [(6.0, 200.0)] * 2
    budget = {"budget_bytes": 10**9}
    shared = plan(qwen35, [Device(n, 48 * 10**9, 6.0, 200.0, host="mac", **budget) for n in "ab"])
    separate = plan(qwen35, [Device(n, 48 * 10**9, 6.0, 200.0, **budget) for n in "ab"])
    for s, p in zip(shared.devices, separate.devices, strict=True):  # same work, at half the rates
        assert (s.read_s, s.compute_s) == pytest.approx((2 * p.read_s, 2 * p.compute_s))


def test_dense_part_at_its_own_rate(qwen35):
    mac = Device("mac", 48 * 10**9, 6.0, 200.0)
    assert plan(qwen35, [mac]).dense_s == pytest.approx(qwen35.dense_read_bytes / 200e9)
    slower = Device("mac", 48 * 10**9, 6.0, 200.0, dense_compute_gbps=50.0)  # many small kernels
    assert plan(qwen35, [slower]).dense_s == pytest.approx(qwen35.dense_read_bytes / 50e9)
    assert plan(qwen35, [slower]).devices[0].compute_s == plan(qwen35, [mac]).devices[0].compute_s


def test_measured_routing_file(qwen35, tmp_path):
    facts = qwen35
    counts = np.zeros((60, 512), dtype=int)
    counts[:, :8] = 100  # every layer uses the same 8 experts: a small cache holds them all
    path = tmp_path / "routing.json"
    path.write_text(json.dumps({"expert_counts": counts.tolist()}))
    hot = plan(facts, [Device("mac", 48 * 10**9, 6.0, 200.0)], routing=Routing.load(path))
    assert hot.hit_rate == pytest.approx(1.0) and hot.read_bytes_per_token == pytest.approx(0.0)
    path.write_text(json.dumps({"hit_rate_curve": [[0.1, 0.5]]}))
    curve = plan(facts, [Device("mac", 48 * 10**9, 6.0, 200.0, budget_bytes=int(0.05 * facts.expert_bytes_total))],
                 routing=Routing.load(path))  # fmt: skip
    assert curve.hit_rate == pytest.approx(0.25, abs=0.01)
    path.write_text("{}")
    with pytest.raises(UserError):
        Routing.load(path)


def test_plan_cli(models):
    _, store = models.get("qwen3_moe")
    proc = flashmesh("plan", store, "--device", "a:4GB:3", "--device", "b=mbp-m3max-48", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["fits"] and [d["name"] for d in result["devices"]] == ["a", "b"] and result["tokens_per_s"] > 0
    text = flashmesh("plan", PUBLISHED / "kimi-k2.5.json", "--device", "mbp-m4max-128", COLUMNS="80")
    assert text.returncode == 0, text.stderr
    assert "predicted decode" in text.stdout and max(len(line) for line in text.stdout.splitlines()) <= 80
    bad = flashmesh("plan", store, "--device", "nonsense")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "presets" in bad.stderr


def test_plan_hub_id_offline_is_one_line(tmp_path):
    proc = flashmesh("plan", "someorg/some-moe-model", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "someorg/some-moe-model" in err, err
