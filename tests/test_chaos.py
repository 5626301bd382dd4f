"""Real node processes on network-namespace hosts (testing.netns; root): the short chaos soak --
`flashmesh serve --cluster` under one fault of each kind -- and `cluster top` finding a node that
restarted on another port. The 10-minute soak is `python -m bench chaos`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from flashmesh.node.store_format import Manifest
from flashmesh.protos import TOKEN_ENV
from flashmesh.testing import netns
from flashmesh.testing.local_nodes import ensure_shards, local_node_processes

from bench.chaos import run_chaos

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=f"{netns.available()}")


def test_short_chaos_soak_serves_every_request_with_identical_greedy_output(models, tmp_path):
    _, store = models.get("qwen3_moe")
    faults = ("sigkill_restart", "sigstop", "link_down", "damaged_record")
    r = run_chaos(store, workdir=tmp_path, clients=2, seconds=44.0, calm_seconds=6.0, fault_every=10.0,
                  fault_seconds=3.0, max_tokens=6, kinds=faults)  # fmt: skip
    summary = {k: v for k, v in r.items() if k not in ("rss_samples", "requests")}
    assert not r["fault_errors"], summary
    assert r["faults_by_kind"] == dict.fromkeys(faults, 1), summary
    assert r["served"] > 0 and r["failed"] == 0, summary
    assert r["greedy_differs"] == 0 and r["calm_greedy_differs"] == 0, summary
    # every node in use again, the SIGKILLed one at the new port only zeroconf told the server of
    assert r["nodes_in_use_at_end"] == r["nodes"] == 3, summary
    restarted = r["faults"][0]["detail"].removeprefix("restarted at ")
    assert any(restarted in n["node"] for n in r["node_states_at_end"]), summary
    assert r["server_exit_code"] == 0, summary


def test_cluster_top_shows_a_node_restarted_on_another_port(models, tmp_path):
    _, store = models.get("qwen3_moe")
    shards = ensure_shards(store, tmp_path, count=2, replicas=2)
    budget = Manifest.load(store).expert_bytes_total
    with netns.netns_hosts(2) as hosts, local_node_processes(
        shards, budgets=[budget] * 2, token="top-token", logdir=tmp_path / "logs", flash_gbps=1.0,
        hosts=hosts.hosts, browse_on=hosts.gateway,
    ) as nodes:  # fmt: skip
        cmd = [sys.executable, "-m", "flashmesh.coordinator.cli", "cluster", "top", "--json", "--interval", "0.5"]
        cmd += ["--iterations", "60", "--interfaces", hosts.gateway, "--expect", "2"]
        cmd += ["--name-prefix", nodes.names[0].rsplit("-", 1)[0]]
        env = {**os.environ, TOKEN_ENV: "top-token"}
        top = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            first = json.loads(top.stdout.readline())
            assert sorted(r["name"] for r in first) == sorted(nodes.names) and not any("error" in r for r in first)
            nodes.procs[0].send_signal(signal.SIGKILL)
            nodes.procs[0].wait()
            moved = nodes.restart(0, same_port=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                rows = {r["name"]: r for r in json.loads(top.stdout.readline())}
                row = rows.get(nodes.names[0], {})
                if row.get("address") == moved.target and "error" not in row:
                    break
            else:
                raise AssertionError(f"cluster top never showed {nodes.names[0]} at {moved.target}: {rows}")
            assert row["node_id"] == moved.node_id and len(rows) == 2
        finally:
            top.send_signal(signal.SIGTERM)
            top.communicate(timeout=30)
