"""The RPC fuzz suite (tests/test_fuzz_rpc.py) against the Swift node (`flashmesh-node`) as a real process:
the same cases, the same expected statuses, and the node still serves afterwards."""

from __future__ import annotations

import grpc
import pytest
from flashmesh.node.bundle_source import BundleExpertSource
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos import flashmesh_pb2_grpc as pb_grpc
from flashmesh.testing.swift_node import MixedNodeProcesses

from . import test_fuzz_rpc as suite

# The suite's tests, collected here with this module's `node`.
test_fuzz_compute_values = suite.test_fuzz_compute_values
test_fuzz_compute = suite.test_fuzz_compute
test_fuzz_prefetch = suite.test_fuzz_prefetch
test_fuzz_token_on_every_rpc = suite.test_fuzz_token_on_every_rpc
test_fuzz_raw_bytes_on_every_rpc = suite.test_fuzz_raw_bytes_on_every_rpc


class RemoteService:
    """What the suite reads of a node service, asked over the wire."""

    def __init__(self, stub: pb_grpc.NodeStub, top_k: int) -> None:
        self.stub, self.top_k = stub, top_k

    def info(self) -> pb.NodeInfo:
        return self.stub.Info(pb.InfoRequest(), metadata=suite.OK, timeout=10)

    def stats(self) -> pb.NodeStats:
        return self.stub.Stats(pb.StatsRequest(), metadata=suite.OK, timeout=10)


@pytest.fixture(scope="module")
def node(bundles, swift_binary, tmp_path_factory):
    root, built = bundles
    store, manifest = built["qwen3_moe"]
    bundle = root / "qwen3_moe.flashmesh-ios"
    top_k = manifest["routing"]["top_k"]
    work = tmp_path_factory.mktemp("fuzz-swift")
    source = BundleExpertSource(bundle)
    budget = source.manifest.min_budget_bytes * 4
    source.close()
    processes = MixedNodeProcesses(
        [bundle], kinds=["swift"], binary=swift_binary, budgets=[budget], token=suite.TOKEN, logdir=work / "logs",
        node_args=[["--count", "2", "--index", "0", "--max-message", str(suite.MAX_MESSAGE)]], flash_gbps=1.0,
    )  # fmt: skip
    try:
        processes.start(0)
        (address,) = processes.find(timeout=60)
        channel = grpc.insecure_channel(address.target)
        n = suite.Node(RemoteService(pb_grpc.NodeStub(channel), top_k), address.port)
        yield n
        n.channel.close()
        channel.close()
        assert processes.procs[0].poll() is None, "the Swift node died during the fuzz"
    finally:
        processes.stop()
