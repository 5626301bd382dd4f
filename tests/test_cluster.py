"""One model across real node processes on loopback: three nodes with disjoint shards, found by
zeroconf bound to 127.0.0.1, greedy tokens identical to the single-machine run; the token, request
validation and the one-line errors of a coordinator that cannot use a node."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.cli import main
from flashmesh.coordinator.client import NodeClient, NodeError
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams
from flashmesh.coordinator.options import ModelOptions
from flashmesh.coordinator.report import run_prompt
from flashmesh.node.shard import write_dense
from flashmesh.node.store_format import Manifest
from flashmesh.node.store_reader import ExpertStore
from flashmesh.protos import TOKEN_METADATA_KEY
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos import flashmesh_pb2_grpc as pb_grpc
from flashmesh.protos.codec import encode, encode_numpy
from flashmesh.testing.local_nodes import ensure_shards, local_nodes

from .conftest import PROMPT, assert_one_line_error, local_tokens, run_cli

TOKEN = f"test-cluster-token-{os.getpid()}"  # nodes of other test runs on 127.0.0.1 refuse it


class Cluster:
    def __init__(self, store, dense, addresses, shards):
        self.store, self.dense, self.addresses, self.shards = store, dense, addresses, shards


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def cluster(request, models, tmp_path_factory):
    _, store = models.get(request.param)
    work = tmp_path_factory.mktemp(f"cluster-{request.param}")
    shards = ensure_shards(store, work, count=3)
    dense = work / "dense"
    write_dense(store, dense)
    budget = Manifest.load(store).min_budget_bytes * 2
    with local_nodes(shards, budgets=[budget] * 3, token=TOKEN, logdir=work / "logs") as addresses:
        yield Cluster(store, dense, addresses, shards)


def test_three_disjoint_nodes_match_the_local_run(cluster):
    held = [set() for _ in cluster.shards]
    for i, shard in enumerate(cluster.shards):
        for spec in Manifest.load(shard).layers:
            held[i] |= {(spec.layer, e) for e in spec.experts}
    assert not (held[0] & held[1]) and not (held[1] & held[2]) and not (held[0] & held[2])
    fingerprint = Manifest.load(cluster.store).fingerprint
    for a in cluster.addresses:
        assert a.source == "zeroconf" and a.host == "127.0.0.1"
        assert a.fingerprint == fingerprint and a.protocol_version == 1 and a.node_id

    options = ModelOptions(store=cluster.dense, cluster=True, nodes=tuple(cluster.addresses), token=TOKEN)
    result = run_prompt(options, PROMPT, SamplingParams(max_tokens=10))
    assert result["tokens"] == local_tokens(cluster.store)
    # Logits too, not only the argmax: the remote path is the local arithmetic moved, bit for bit.
    remote = open_model(ModelOptions(store=cluster.dense, cluster=True, nodes=tuple(cluster.addresses), token=TOKEN))
    local = open_model(ModelOptions(store=cluster.store, ram_budget=Manifest.load(cluster.store).expert_bytes_total))
    try:
        prompt = mx.array(local.tokenizer.encode(PROMPT))[None]
        np.testing.assert_array_equal(np.array(remote.model(prompt)), np.array(local.model(prompt)))
    finally:
        remote.close()
        local.close()
    d = result["dispatch"]
    assert d["rpc_requests"] <= 3 * d["moe_layer_calls"]  # one request per node per layer at most
    assert d["rpc_requests"] > d["moe_layer_calls"]  # and the work really is spread
    assert len(result["nodes"]) == 3 and all(n["requests"] > 0 for n in result["nodes"])
    # each node says what reads its records (Linux AIO where it is built and the files take O_DIRECT)
    assert sorted(n["reader"] for n in result["nodes"]) == sorted(_reader(s) for s in cluster.shards)
    assert 0 < result["peak_cache_bytes"] <= result["ram_budget_bytes"]


def _reader(store) -> str:
    """What a node serving `store` with `node serve`'s defaults reads its records with."""
    with ExpertStore(store) as opened:
        return opened.reader


def _ours(cluster) -> list[str]:
    """Zeroconf on 127.0.0.1 is shared with other test runs: find only this fixture's nodes."""
    return ["--name-prefix", cluster.addresses[0].name.rsplit("-", 1)[0] + "-"]


ONLY_QWEN = pytest.mark.parametrize("cluster", ["qwen3_moe"], indirect=True)


@ONLY_QWEN
def test_run_cli_on_the_cluster(cluster):
    env = {**os.environ, "FLASHMESH_TOKEN": TOKEN, "TRANSFORMERS_VERBOSITY": "error"}
    args = ["run", cluster.dense, "--cluster", "--expect", "3", *_ours(cluster), "--prompt", PROMPT, "--json"]
    args += ["--max-tokens", "10"]
    proc = subprocess.run(
        [sys.executable, "-m", "flashmesh.coordinator.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["tokens"] == local_tokens(cluster.store)
    assert {n["address"] for n in result["nodes"]} == {a.target for a in cluster.addresses}


@ONLY_QWEN
def test_cluster_ls_inspect_top(cluster, capsys):
    static = [x for a in cluster.addresses for x in ("--node", a.target)]
    assert main(["cluster", "ls", "--json", "--token", TOKEN, "--no-zeroconf", *static]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    fingerprint = Manifest.load(cluster.store).fingerprint
    for row in rows:
        assert row["fingerprint"] == fingerprint and row["protocol_version"] == 1
        assert row["experts_held"] == row["experts_assigned"] > 0 and row["rpc_latency_ms"] > 0
    assert sum(r["experts_held"] for r in rows) == rows[0]["experts_total"]
    inspect = ["cluster", "inspect", "--token", TOKEN, "--interfaces", "127.0.0.1", "--expect", "3", *_ours(cluster)]
    assert main(inspect) == 0
    text = capsys.readouterr().out
    assert "experts held" in text and "assigned" in text and cluster.addresses[0].target in text
    assert main(["cluster", "top", "--json", "--iterations", "2", "--interval", "0.1", "--token", TOKEN, *static,
                 "--no-zeroconf"]) == 0  # fmt: skip
    frames = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(frames) == 2 and len(frames[1]) == 3


@ONLY_QWEN
def test_cluster_tables_fit_80_columns(cluster, monkeypatch):
    import io

    from flashmesh.coordinator import cluster_cli
    from rich.console import Console

    static = [x for a in cluster.addresses for x in ("--node", a.target)]
    for command in (["ls"], ["inspect"], ["top", "--iterations", "1"]):
        console = Console(width=80, file=io.StringIO(), record=True)
        monkeypatch.setattr(cluster_cli, "out", console)
        assert main(["cluster", *command, "--token", TOKEN, "--no-zeroconf", *static]) == 0
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text, text
        for a in cluster.addresses:
            assert a.target in text and a.name in text, text


def _stub(address):
    channel = grpc.insecure_channel(address.target)
    return channel, pb_grpc.NodeStub(channel)


def test_token_and_validation_over_grpc(cluster):
    address = cluster.addresses[0]
    channel, stub = _stub(address)
    try:
        for metadata in ((), ((TOKEN_METADATA_KEY, "wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Info(pb.InfoRequest(), metadata=metadata, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = ((TOKEN_METADATA_KEY, TOKEN),)
        info = stub.Info(pb.InfoRequest(), metadata=ok, timeout=10)
        layer = info.layers[0]
        d = info.hidden_size
        not_held = next(e for e in range(layer.num_experts) if e not in set(layer.experts))
        base = dict(layer=layer.layer, x=encode(mx.ones((1, d))), rows=encode_numpy(np.array([0], np.int32)))
        for request in (
            pb.ComputeRequest(**base, experts=encode_numpy(np.array([not_held], np.int32))),
            pb.ComputeRequest(**{**base, "layer": 9999}, experts=encode_numpy(np.array([layer.experts[0]], np.int32))),
            pb.ComputeRequest(
                **{**base, "x": encode(mx.ones((1, d + 1)))},
                experts=encode_numpy(np.array([layer.experts[0]], np.int32)),
            ),  # fmt: skip
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.Compute(request, metadata=ok, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        good = pb.ComputeRequest(**base, experts=encode_numpy(np.array([layer.experts[0]], np.int32)))
        reply = stub.Compute(good, metadata=ok, timeout=30)  # the node keeps serving
        assert list(reply.y.shape) == [1, d]
        assert stub.Health(pb.HealthRequest(), metadata=ok, timeout=10).serving
        assert stub.Stats(pb.StatsRequest(), metadata=ok, timeout=10).rejected >= 5
    finally:
        channel.close()


@ONLY_QWEN
def test_coordinator_errors_are_one_line(cluster, models, capsys, monkeypatch):
    target = cluster.addresses[0].target
    code, _, err = run_cli(capsys, "run", cluster.dense, "--node", target, "--no-zeroconf", "--token", "wrong",
                     "--prompt", "hi")  # fmt: skip
    assert_one_line_error(code, err, target, "token")
    _, other = models.get("mixtral")
    code, _, err = run_cli(capsys, "run", other, "--node", target, "--no-zeroconf", "--token", TOKEN, "--prompt", "hi")
    assert_one_line_error(code, err, target, "serves model", "not this store's")
    code, _, err = run_cli(capsys, "run", cluster.dense, "--node", target, "--no-zeroconf", "--token", TOKEN,
                     "--prompt", "hi")  # fmt: skip
    assert_one_line_error(code, err, "held by no node")  # one node of three does not cover the model
    monkeypatch.setenv("FLASHMESH_TOKEN", TOKEN)
    code, _, err = run_cli(capsys, "run", cluster.dense, "--cluster", "--expect", "3", *_ours(cluster),
                           "--prompt", "hi", "--max-tokens", "2")  # fmt: skip
    assert code == 0, err  # zeroconf finds the three nodes, the token comes from the environment
    monkeypatch.delenv("FLASHMESH_TOKEN")
    code, _, err = run_cli(capsys, "run", cluster.dense, "--cluster", "--prompt", "hi")
    assert_one_line_error(code, err, "--token", "FLASHMESH_TOKEN")


def test_unreachable_node_and_cleanup(models, tmp_path, capsys):
    """A node process stops with its context; afterwards the coordinator names it as unreachable."""
    _, store = models.get("qwen3_moe")
    budget = Manifest.load(store).min_budget_bytes
    with local_nodes([store], budgets=[budget], token=TOKEN, logdir=tmp_path) as (address,):
        client = NodeClient(address, token=TOKEN)
        assert client.health().serving
        client.close()
    client = NodeClient(address, token=TOKEN, timeout=5)
    with pytest.raises(NodeError, match=rf"{address.target}.*unreachable"):
        client.health()
    client.close()
    code, _, err = run_cli(
        capsys, "run", store, "--node", address.target, "--no-zeroconf", "--token", TOKEN, "--prompt", "x"
    )
    assert_one_line_error(code, err, address.target, "unreachable")


def test_advertisement_carries_no_secret(cluster):
    from flashmesh.node.advertise import instance_name
    from flashmesh.protos import SERVICE_TYPE
    from zeroconf import IPVersion, Zeroconf

    a = cluster.addresses[0]
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        info = zc.get_service_info(SERVICE_TYPE, f"{instance_name(a.name, a.node_id)}.{SERVICE_TYPE}", timeout=3000)
    finally:
        zc.close()
    assert info is not None and info.port == a.port
    props = {k.decode(): v.decode() for k, v in info.properties.items()}
    assert set(props) == {"id", "name", "fp", "proto", "port"}
    assert TOKEN not in "".join(props.values())
