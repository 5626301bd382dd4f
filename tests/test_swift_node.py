"""The Swift node (`mobile_export/ios`, `flashmesh-node`) as a real process on 127.0.0.1, serving a bundle
exported from a test model, in clusters with the Python coordinator (and a Python node): greedy tokens
equal the local run; logits within the bundle node's tolerance (tests/test_bundle_node.py: the bundle's
fp16 rounding of each expert weight, or of the affine scales and biases; the Swift node computes in fp32
as the Python bundle node does, differing from it only in summation order, ~1e-6 relative); wrong tokens,
damaged records, a killed node.

Without a Swift toolchain these tests skip, loudly; with FLASHMESH_REQUIRE_SWIFT=1 (.ci/run) they fail.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import grpc
import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.cli import main
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.bundle_source import BundleExpertSource
from flashmesh.node.expert_source import READERS
from flashmesh.node.shard import write_dense
from flashmesh.node.store_format import Manifest
from flashmesh.protos import LOST_RECORDS_METADATA_KEY, TOKEN_METADATA_KEY
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos import flashmesh_pb2_grpc as pb_grpc
from flashmesh.protos.codec import encode_numpy
from flashmesh.protos.errors import ErrorKind
from flashmesh.testing.faults import generate_with_faults
from flashmesh.testing.swift_node import MixedNodeProcesses, bundle_expert_bytes

PROMPT = "The quick brown fox jumps over the lazy dog. Mixture of experts"
TOKEN = "test-swift-token"
MAX_TOKENS = 8
FP16_WEIGHTS_RTOL = 5e-3  # tests/test_bundle_node.py


@pytest.fixture(scope="module")
def cases(swift_bundles, tmp_path_factory):
    """name -> (store, bundle, the store's dense part) for every bundle of conftest's `swift_bundles`."""
    work = tmp_path_factory.mktemp("swift-dense")
    result = {}
    for name, (store, bundle) in swift_bundles.items():
        dense = work / f"{name}-dense"
        write_dense(store, dense)
        result[name] = (store, bundle, dense)
    return result


def _layer_spec(bundle: Path, layer: int):
    source = BundleExpertSource(bundle)
    try:
        return source.layer(layer)
    finally:
        source.close()


def _nodes(sources, kinds, binary, work: Path, *, node_args=None) -> MixedNodeProcesses:
    budgets = [bundle_expert_bytes(s) for s in sources]
    return MixedNodeProcesses(
        sources, kinds=kinds, binary=binary, budgets=budgets, token=TOKEN, logdir=work / "logs",
        node_args=node_args, flash_gbps=1.0,
    )  # fmt: skip


class Running:
    def __init__(self, nodes: MixedNodeProcesses) -> None:
        self.nodes = nodes

    def __enter__(self) -> MixedNodeProcesses:
        try:
            for i in range(len(self.nodes.shards)):
                self.nodes.start(i)
            self.nodes.find(timeout=60)
        except BaseException:
            self.nodes.stop()
            raise
        return self.nodes

    def __exit__(self, *exc) -> None:
        self.nodes.stop()


def _local(store: Path):
    """Tokens and logits of the single-machine run."""
    local = open_model(ModelOptions(store=store, ram_budget=Manifest.load(store).expert_bytes_total))
    try:
        prompt = encode_prompt(local.tokenizer, PROMPT, chat=False)
        tokens = generate(local.model, local.tokenizer, prompt, SamplingParams(max_tokens=MAX_TOKENS)).tokens
        logits = np.array(local.model(mx.array(local.tokenizer.encode(PROMPT))[None]))
    finally:
        local.close()
    return tokens, logits


def _run_json(dense: Path, addresses, capsys) -> dict:
    nodes = [x for a in addresses for x in ("--node", a.target)]
    args = ["run", str(dense), "--cluster", *nodes, "--no-zeroconf", "--token", TOKEN, "--prompt", PROMPT]
    assert main([*args, "--max-tokens", str(MAX_TOKENS), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _open_cluster(dense: Path, addresses, **options):
    return open_model(ModelOptions(store=dense, cluster=True, nodes=tuple(addresses), token=TOKEN, **options))


def _logits(dense: Path, addresses) -> np.ndarray:
    remote = _open_cluster(dense, addresses)
    try:
        tokenizer = remote.tokenizer
        return np.array(remote.model(mx.array(tokenizer.encode(PROMPT))[None]))
    finally:
        remote.close()


@pytest.mark.parametrize("case", ["qwen3_moe-fp16", "deepseek_v3-fp16", "qwen3_moe-q4-iOS18", "qwen3_moe-q4-iOS26"])
def test_swift_node_cluster_equals_the_local_run(swift_binary, cases, tmp_path, capsys, case):
    store, bundle, dense = cases[case]
    want_tokens, want_logits = _local(store)
    with Running(_nodes([bundle], ["swift"], swift_binary, tmp_path)) as nodes:
        result = _run_json(dense, nodes.addresses, capsys)
        got_logits = _logits(dense, nodes.addresses)
    assert result["tokens"] == want_tokens
    assert len(result["nodes"]) == 1 and result["nodes"][0]["requests"] > 0
    assert result["nodes"][0]["reader"] == "threads"  # the Swift node's RecordReader
    assert result["expert_bytes_read"] > 0
    error = np.abs(want_logits - got_logits).max()
    assert error <= FP16_WEIGHTS_RTOL * max(1.0, float(np.abs(want_logits).max())), error


def test_swift_node_under_a_small_budget_with_lookahead(swift_binary, cases, tmp_path, capsys):
    """Two layers' top-k experts of budget: the prompt's chunk is computed in waves, experts are evicted
    (LFU with aging, the default) and the router lookahead's hints are read ahead."""
    store, bundle, dense = cases["qwen3_moe-fp16"]
    want_tokens, _ = _local(store)
    nodes = _nodes([bundle], ["swift"], swift_binary, tmp_path)
    source = BundleExpertSource(bundle)
    nodes.budgets = [2 * source.manifest.min_budget_bytes]
    source.close()
    with Running(nodes):
        listing = ["--node", nodes.addresses[0].target, "--no-zeroconf", "--token", TOKEN, "--prompt", PROMPT]
        assert main(["run", str(dense), "--cluster", *listing, "--max-tokens", str(MAX_TOKENS), "--lookahead",
                     "--json"]) == 0  # fmt: skip
        result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == want_tokens
    (node,) = result["nodes"]
    assert node["prefetched"] > 0 and result["cache_hit_rate"] < 1.0


def test_mixed_cluster_python_and_swift_nodes(swift_binary, cases, tmp_path, capsys):
    """One Python node and one Swift node, each half of the bundle (`--count 2 --index I`)."""
    store, bundle, dense = cases["qwen3_moe-fp16"]
    want_tokens, _ = _local(store)
    halves = [["--count", "2", "--index", str(i)] for i in range(2)]
    with Running(_nodes([bundle, bundle], ["python", "swift"], swift_binary, tmp_path, node_args=halves)) as nodes:
        result = _run_json(dense, nodes.addresses, capsys)
        assert result["tokens"] == want_tokens
        assert len(result["nodes"]) == 2 and all(n["requests"] > 0 for n in result["nodes"])
        listing = [x for a in nodes.addresses for x in ("--node", a.target)]
        assert main(["cluster", "ls", *listing, "--no-zeroconf", "--token", TOKEN, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        rows = rows["nodes"] if isinstance(rows, dict) else rows
        assert sorted(r["name"] for r in rows) == sorted(nodes.names)
        assert all(r["reader"] in READERS for r in rows)
        assert {r["experts_held"] for r in rows} == {sum(len(s.experts) for s in Manifest.load(store).layers) // 2}


def _stub(address):
    channel = grpc.insecure_channel(address.target)
    return channel, pb_grpc.NodeStub(channel)


def test_wrong_token_and_damaged_record(swift_binary, cases, tmp_path):
    store, bundle, _ = cases["qwen3_moe-fp16"]
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    spec = _layer_spec(copy, Manifest.load(store).layers[0].layer)
    path = copy / spec.file
    data = bytearray(path.read_bytes())
    data[3 * spec.record_size + 100] ^= 0xFF  # inside expert 3's record
    path.write_bytes(bytes(data))
    with Running(_nodes([copy], ["swift"], swift_binary, tmp_path)) as nodes:
        channel, stub = _stub(nodes.addresses[0])
        try:
            for token in (None, "wrong", TOKEN + " "):
                metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
                with pytest.raises(grpc.RpcError) as e:
                    stub.Info(pb.InfoRequest(), metadata=metadata, timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = stub.Info(pb.InfoRequest(), metadata=((TOKEN_METADATA_KEY, TOKEN),), timeout=10)
            x = np.ones((1, info.hidden_size), np.float32)
            request = pb.ComputeRequest(
                layer=spec.layer, x=encode_numpy(x), rows=encode_numpy(np.array([0], np.int32)),
                experts=encode_numpy(np.array([3], np.int32)),
            )  # fmt: skip
            with pytest.raises(grpc.RpcError) as e:
                stub.Compute(request, metadata=((TOKEN_METADATA_KEY, TOKEN),), timeout=10)
            assert e.value.code() == grpc.StatusCode.DATA_LOSS
            assert f"layer {spec.layer} expert 3: record checksum mismatch" in e.value.details()
            assert "re-export the bundle" in e.value.details()
            trailer = dict(e.value.trailing_metadata())
            assert trailer[LOST_RECORDS_METADATA_KEY] == f"{spec.layer}:3"
            stats = stub.Stats(pb.StatsRequest(), metadata=((TOKEN_METADATA_KEY, TOKEN),), timeout=10)
            assert stats.rejected == 3
        finally:
            channel.close()


def _replicated(bundle: Path, copy: Path, swift_binary, work: Path) -> MixedNodeProcesses:
    """A Swift node and a Python node, each serving every expert (from its own copy of the bundle)."""
    return _nodes([copy, bundle], ["swift", "python"], swift_binary, work)


def test_damaged_records_fail_over_to_a_replica(swift_binary, cases, tmp_path):
    store, bundle, dense = cases["qwen3_moe-fp16"]
    want_tokens, _ = _local(store)
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    spec = _layer_spec(copy, Manifest.load(store).layers[0].layer)
    path = copy / spec.file
    data = bytearray(path.read_bytes())
    for e in range(len(spec.experts)):  # every record of the first MoE layer, on the Swift node only
        data[e * spec.record_size + 64] ^= 0xFF
    path.write_bytes(bytes(data))
    with Running(_replicated(bundle, copy, swift_binary, tmp_path)) as nodes:
        streaming = _open_cluster(dense, nodes.addresses, probe_backoff=0.2)
        try:
            assert generate_with_faults(streaming, PROMPT, max_tokens=MAX_TOKENS) == want_tokens
            failovers = [f for f in streaming.backend.dispatch.failovers if f.kind == ErrorKind.DATA_LOSS]
            assert failovers and {f.layer for f in failovers} == {spec.layer}
            assert all(f"layer {spec.layer} expert" in f.reason and "checksum mismatch" in f.reason for f in failovers)
        finally:
            streaming.close()


def test_sigkill_of_the_swift_node_mid_generation(swift_binary, cases, tmp_path):
    store, bundle, dense = cases["qwen3_moe-fp16"]
    want_tokens, _ = _local(store)
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    moe_layers = len(Manifest.load(store).layers)
    with Running(_replicated(bundle, copy, swift_binary, tmp_path)) as nodes:
        streaming = _open_cluster(dense, nodes.addresses, rpc_deadline=2.0, probe_backoff=0.2)
        victim = nodes.procs[0]
        try:

            def kill(n):
                if n == moe_layers * 3 + 1:  # prefill, two decode steps, then inside the third
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()

            assert generate_with_faults(streaming, PROMPT, max_tokens=MAX_TOKENS, on_layer_call=kill) == want_tokens
            swift_id = next(n for n, link in streaming.backend.links.items() if nodes.names[0] in link.label)
            assert streaming.backend.placement.assigned(swift_id)  # the Swift node had work to lose
            failovers = [f for f in streaming.backend.dispatch.failovers if nodes.names[0] in f.node]
            assert [f.kind for f in failovers] == [ErrorKind.UNAVAILABLE]
            assert streaming.backend.membership.down() == [swift_id]
        finally:
            streaming.close()


def test_swift_node_exits_zero_on_sigterm_and_refuses_bad_input_in_one_line(swift_binary, cases, tmp_path):
    import subprocess

    _, bundle, _ = cases["qwen3_moe-fp16"]
    with Running(_nodes([bundle], ["swift"], swift_binary, tmp_path)) as nodes:
        nodes.procs[0].send_signal(signal.SIGTERM)
        assert nodes.procs[0].wait(timeout=15) == 0
    for args, words in (
        (["--ram-budget", "1GB"], "--bundle"),
        (["--bundle", str(tmp_path), "--ram-budget", "1GB"], "not a flashmesh iOS bundle"),
        (["--bundle", str(bundle), "--ram-budget", "1KB"], "below this model's minimum"),
        (["--bundle", str(bundle), "--ram-budget", "lots"], "cannot read 'lots' as a size"),
        (["--bundle", str(bundle), "--ram-budget", "1GB", "--count", "2", "--index", "2"], "index"),
        (["--bundle", str(bundle), "--ram-budget", "1GB", "--frobnicate"], "unknown option"),
        (["--bundle", str(bundle), "--ram-budget", "1GB", "--compute", "npu"], "auto, cpu or gpu"),
        (["--bundle", str(bundle), "--ram-budget", "1GB", "--compute", "gpu"], "no Metal GPU here"),  # Linux
    ):
        done = subprocess.run([str(swift_binary), *args, "--token", TOKEN], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, done.stderr)
