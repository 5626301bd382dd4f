"""Property-based fuzz (hypothesis) of every RPC of protos/flashmesh.proto against a real gRPC node on
127.0.0.1: malformed, oversized and adversarial requests get INVALID_ARGUMENT, UNAUTHENTICATED or
RESOURCE_EXHAUSTED (never an unhandled error), and the node keeps serving valid requests."""

from __future__ import annotations

import logging
from collections import Counter

import grpc
import numpy as np
import pytest
from flashmesh.node.server import start_server
from flashmesh.node.service import NodeService
from flashmesh.node.shard import write_shard
from flashmesh.node.store_format import Manifest
from flashmesh.protos import TOKEN_METADATA_KEY
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos import flashmesh_pb2_grpc as pb_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

log = logging.getLogger(__name__)

TOKEN = "fuzz-token"
OK = ((TOKEN_METADATA_KEY, TOKEN),)
MAX_MESSAGE = 64 * 1024  # a small limit, so oversized requests are cheap to make
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible, not a flake
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
CASES: Counter = Counter()  # (rpc, status) -> cases run


class Node:
    def __init__(self, service, port):
        self.service, self.port = service, port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.NodeStub(self.channel)
        info = service.info()
        self.d = info.hidden_size
        self.layers = {h.layer: list(h.experts) for h in info.layers}
        self.num_experts = info.layers[0].num_experts

    def call(self, rpc: str, request, metadata=OK):
        """Send; return the status (OK or the error's), counting the case."""
        try:
            reply = getattr(self.stub, rpc)(request, metadata=metadata, timeout=30)
            status = grpc.StatusCode.OK
        except grpc.RpcError as e:
            reply, status = None, e.code()
            assert status in EXPECTED, f"{rpc}: {status} {e.details()}"
        CASES[(rpc, status.name)] += 1
        return status, reply

    def valid_compute(self) -> pb.ComputeRequest:
        layer, experts = next(iter(self.layers.items()))
        return pb.ComputeRequest(
            layer=layer,
            x=_tensor(np.ones((2, self.d), np.float32)),
            rows=_tensor(np.array([0, 1], np.int32)),
            experts=_tensor(np.array(experts[:2], np.int32)),
        )

    def still_serving(self) -> None:
        reply = self.stub.Compute(self.valid_compute(), metadata=OK, timeout=30)
        assert list(reply.y.shape) == [2, self.d] and np.isfinite(np.frombuffer(reply.y.data, np.float32)).all()
        assert self.stub.Health(pb.HealthRequest(), metadata=OK, timeout=10).serving


def fuzzed(run, *, at_least: int = 80) -> Counter:
    """Run a hypothesis test; return the cases it ran by (rpc, status), checking that it really ran
    (so a green run means something) whatever other tests ran before it."""
    before = CASES.copy()
    run()
    ran = CASES - before
    assert sum(ran.values()) >= at_least, dict(ran)
    return ran


def _tensor(a: np.ndarray, dtype: str | None = None) -> pb.Tensor:
    return pb.Tensor(dtype=dtype or a.dtype.name, shape=list(a.shape), data=a.tobytes())


@pytest.fixture(scope="module")
def node(models, tmp_path_factory):
    _, store = models.get("qwen3_moe")
    shard = tmp_path_factory.mktemp("fuzz") / "half"
    write_shard(store, shard, count=2, index=0)
    service = NodeService(
        shard,
        ram_budget=Manifest.load(store).min_budget_bytes * 4,
        token=TOKEN,
        name="fuzz",
        flash_gbps=1.0,
        max_message_bytes=MAX_MESSAGE,
    )
    server, port = start_server(service, addresses=["127.0.0.1"], port=0)
    n = Node(service, port)
    try:
        yield n
    finally:
        n.channel.close()
        server.stop(grace=None).wait()
        service.close()
    total = sum(CASES.values())
    log.warning("RPC fuzz: %d cases: %s", total, dict(sorted(CASES.items())))


DTYPES = ["float32", "float16", "bfloat16", "int32", "int64", "uint8", "int8", "uint32", "complex64", "", "f\x00"]
ints = st.one_of(
    st.integers(-3, 40), st.sampled_from([-(2**31), 2**31 - 1, -1, 2**16, 9999]), st.integers(-(2**31), 2**31 - 1)
)
dims = st.one_of(st.integers(0, 70), st.sampled_from([-1, 2**31, 2**40, 2**62, 2**63 - 1]))


@st.composite
def tensors(draw, *, d: int) -> pb.Tensor:
    """Well-formed tensors of odd shapes and dtypes, and malformed ones (bytes not matching shape)."""
    kind = draw(st.sampled_from(["hidden", "index", "odd", "garbage"]))
    if kind == "hidden":
        m = draw(st.integers(0, 6))
        dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
        npd = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
        values = draw(st.sampled_from([0.0, 1.0, -3.5, np.nan, np.inf, 1e30]))
        a = np.full((m, draw(st.sampled_from([d, d - 1, d + 1, 1]))), values, np.float32)
        with np.errstate(over="ignore"):
            data = a.astype(npd) if dtype != "bfloat16" else (a.view(np.uint32) >> 16).astype(np.uint16)
        data = data.tobytes()
        return pb.Tensor(dtype=dtype, shape=list(a.shape), data=data)
    if kind == "index":
        values = draw(st.lists(ints, min_size=0, max_size=12))
        dtype = draw(st.sampled_from(["int32", "int32", "int64", "float32"]))
        a = np.array(values, dtype=np.int64).clip(-(2**31), 2**31 - 1).astype(dtype)
        return pb.Tensor(dtype=dtype, shape=list(a.shape), data=a.tobytes())
    if kind == "odd":
        shape = draw(st.lists(dims, min_size=0, max_size=4))
        return pb.Tensor(dtype=draw(st.sampled_from(DTYPES)), shape=shape, data=draw(st.binary(max_size=64)))
    return pb.Tensor(dtype=draw(st.text(max_size=8)), shape=draw(st.lists(dims, max_size=3)), data=b"\x00" * 7)


@st.composite
def compute_requests(draw, node: Node) -> pb.ComputeRequest:
    """Mostly a valid request with one or two parts replaced by something adversarial."""
    base = node.valid_compute()
    layer = draw(st.one_of(st.sampled_from(list(node.layers)), ints))
    x = draw(st.one_of(st.just(base.x), tensors(d=node.d)))
    rows = draw(st.one_of(st.just(base.rows), tensors(d=node.d)))
    experts = draw(st.one_of(st.just(base.experts), tensors(d=node.d)))
    request = pb.ComputeRequest(layer=layer, x=x, rows=rows, experts=experts)
    if draw(st.booleans()):
        request.next.CopyFrom(pb.PrefetchRequest(layer=draw(ints), experts=draw(st.lists(ints, max_size=8))))
    if draw(st.integers(0, 9)) == 0:  # oversized: padded far past the node's limit (or gRPC's)
        request.x.data += b"\x00" * draw(st.sampled_from([MAX_MESSAGE, 2 * MAX_MESSAGE + 2 * 1024 * 1024]))
    return request


@st.composite
def well_formed_compute(draw, node: Node) -> tuple[pb.ComputeRequest, bool]:
    """Structurally valid requests (held experts, rows in range, up to top-k pairs per token) with
    adversarial values: NaN, infinities, huge and tiny floats, every float dtype, duplicate pairs.
    Returns (request, whether the node must accept it)."""
    layer = draw(st.sampled_from(list(node.layers)))
    m = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.0, 1e-38, 1e-3, 1.0, 1e3, 1e30]))
    values = (rng.standard_normal((m, node.d)) * scale).astype(np.float32)  # [M, D]
    for _ in range(draw(st.integers(0, 2))):  # a few special values at drawn places
        values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.0]))
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflows to inf: the node must refuse it
        if dtype == "bfloat16":
            data = (values.view(np.uint32) >> 16).astype(np.uint16)
            finite = bool(((data & 0x7F80) != 0x7F80).all())
        else:
            data = values.astype(dtype)
            finite = bool(np.isfinite(data).all())
    pairs = draw(st.integers(1, m * node.service.top_k))
    rows = np.array(draw(st.lists(st.integers(0, m - 1), min_size=pairs, max_size=pairs)), np.int32)
    experts = np.array(draw(st.lists(st.sampled_from(node.layers[layer]), min_size=pairs, max_size=pairs)), np.int32)
    request = pb.ComputeRequest(
        layer=layer, x=_tensor(data, dtype), rows=_tensor(rows), experts=_tensor(experts)
    )  # fmt: skip
    return request, finite


def test_fuzz_compute_values(node):
    @FUZZ
    @given(case=well_formed_compute(node))
    def run(case):
        request, finite = case
        status, reply = node.call("Compute", request)
        assert status == (grpc.StatusCode.OK if finite else grpc.StatusCode.INVALID_ARGUMENT)
        if finite:
            assert list(reply.y.shape) == [len(request.rows.data) // 4, node.d]

    ran = fuzzed(run)
    assert ran[("Compute", "INVALID_ARGUMENT")] > 0 and ran[("Compute", "OK")] > 0
    node.still_serving()


def test_fuzz_compute(node):
    @FUZZ
    @given(request=compute_requests(node))
    def run(request):
        status, reply = node.call("Compute", request)
        if status == grpc.StatusCode.OK:
            pairs = len(request.rows.data) // 4
            assert list(reply.y.shape) == [pairs, node.d] and len(reply.y.data) == pairs * node.d * 4

    fuzzed(run)
    node.still_serving()
    assert node.service.stats().rejected > 0


def test_fuzz_prefetch(node):
    @FUZZ
    @given(layer=st.one_of(st.sampled_from(list(node.layers)), ints), experts=st.lists(ints, max_size=40))
    def run(layer, experts):
        status, reply = node.call("Prefetch", pb.PrefetchRequest(layer=layer, experts=experts))
        held = node.layers.get(layer)
        valid = held is not None and all(e in held for e in experts)
        assert (status == grpc.StatusCode.OK) == valid, (layer, experts, status)

    fuzzed(run)
    node.still_serving()


METADATA_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def test_fuzz_token_on_every_rpc(node):
    """Missing, wrong, near-miss and oversized tokens are refused on every RPC, before any work."""
    requests = {
        "Info": pb.InfoRequest(),
        "Stats": pb.StatsRequest(),
        "Health": pb.HealthRequest(),
        "Prefetch": pb.PrefetchRequest(layer=next(iter(node.layers)), experts=[]),
        "Compute": node.valid_compute(),
    }

    @FUZZ
    @given(
        rpc=st.sampled_from(sorted(requests)),
        token=st.one_of(
            st.none(),
            METADATA_TEXT,
            st.just(TOKEN[:-1]),
            st.just(TOKEN + " "),
            st.just(TOKEN.upper()),
            st.just("x" * 4000),
        ),
    )
    def run(rpc, token):
        metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
        status, _ = node.call(rpc, requests[rpc], metadata=metadata)
        expected = grpc.StatusCode.OK if token == TOKEN else grpc.StatusCode.UNAUTHENTICATED
        assert status == expected

    fuzzed(run)
    for rpc, request in requests.items():
        assert node.call(rpc, request)[0] == grpc.StatusCode.OK


def test_fuzz_raw_bytes_on_every_rpc(node):
    """Arbitrary bytes as the serialized request of each RPC: a message that does not parse is
    refused, one that parses (protobuf accepts many byte strings) is validated like any other."""
    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}")
    methods = {
        name: channel.unary_unary(f"/flashmesh.v1.Node/{name}", request_serializer=None, response_deserializer=None)
        for name in ("Info", "Compute", "Prefetch", "Stats", "Health")
    }

    @FUZZ
    @given(rpc=st.sampled_from(sorted(methods)), data=st.binary(max_size=300))
    def run(rpc, data):
        try:
            methods[rpc](data, metadata=OK, timeout=30)
            status = grpc.StatusCode.OK
        except grpc.RpcError as e:
            status = e.code()
            assert status in EXPECTED, f"{rpc}: {status} {e.details()}"
        CASES[(f"{rpc} (raw bytes)", status.name)] += 1

    try:
        fuzzed(run)
    finally:
        channel.close()
    node.still_serving()
