"""`flashmesh node serve --bundle`: a node serving experts from an iPhone bundle's own record files.

The cluster test runs two real node processes on loopback, each serving half of the experts from
the bundle's files (found by their unique names over zeroconf on 127.0.0.1), with the coordinator
holding the dense part of the store the bundle was exported from: greedy tokens equal the local
run, logits within the tolerance below.

Tolerance: the bundle stores experts in fp16, the node upcasts them to fp32 and computes exactly as
a store node does, so the only difference from the local run is one rounding of each expert weight
(relative error <= 2**-11 ~ 4.9e-4). An expert output is a sum of products of those weights, so its
relative error is bounded by about the same 4.9e-4 (errors of mixed signs partly cancel); over the
3 layers the residual stream and the LM head carry a few such errors. We allow 5e-3 * max(1,
max|logit|), ten roundoffs, a quarter of the 2e-2 the reference executor's test justifies for fp16
arithmetic in every op (tests/test_mobile_export_reference.py). Measured: 2.3e-4 on logits up to 2.3.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.cli import main
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.coordinator.report import run_prompt
from flashmesh.mobile_export.bundle_format import unpack_affine
from flashmesh.mobile_export.exporter import export_ios
from flashmesh.mobile_export.records import INT8_OFFSET
from flashmesh.node.bundle_source import BundleExpertSource, pack_affine
from flashmesh.node.service import NodeService, RequestError
from flashmesh.node.shard import write_dense
from flashmesh.node.store_format import Manifest
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.codec import encode_numpy, to_numpy
from flashmesh.protos.errors import ErrorKind
from flashmesh.testing.local_nodes import local_nodes

from .conftest import PROMPT, assert_one_line_error

TOKEN = "test-bundle-token"
FP16_WEIGHTS_RTOL = 5e-3  # see the module docstring


def _bundle(bundles, arch="qwen3_moe"):
    root, built = bundles
    store, _ = built[arch]
    return store, root / f"{arch}.flashmesh-ios"


def test_bundle_nodes_serve_a_cluster_like_store_nodes(bundles, tmp_path):
    """Two node processes each serve half of the bundle (`--count 2 --index I`), read in place."""
    store, bundle = _bundle(bundles)
    dense = tmp_path / "dense"
    write_dense(store, dense)
    manifest = Manifest.load(store)
    budget = manifest.expert_bytes_total  # fp32 in RAM after the upcast: every expert fits
    halves = [["--count", "2", "--index", str(i)] for i in range(2)]
    with local_nodes(
        [bundle, bundle], budgets=[budget] * 2, token=TOKEN, logdir=tmp_path / "logs", node_args=halves
    ) as addresses:
        # each bundle records the fingerprint of the store it was exported from
        assert all(a.fingerprint == manifest.fingerprint for a in addresses)

        options = ModelOptions(store=dense, cluster=True, nodes=tuple(addresses), token=TOKEN)
        result = run_prompt(options, PROMPT, SamplingParams(max_tokens=10))
        local = open_model(ModelOptions(store=store, ram_budget=manifest.expert_bytes_total))
        remote = open_model(ModelOptions(store=dense, cluster=True, nodes=tuple(addresses), token=TOKEN))
        try:
            prompt = encode_prompt(local.tokenizer, PROMPT, chat=False)
            assert (
                result["tokens"] == generate(local.model, local.tokenizer, prompt, SamplingParams(max_tokens=10)).tokens
            )
            x = mx.array(local.tokenizer.encode(PROMPT))[None]
            want, got = np.array(local.model(x)), np.array(remote.model(x))
        finally:
            remote.close()
            local.close()
        assert np.abs(want - got).max() <= FP16_WEIGHTS_RTOL * max(1.0, float(np.abs(want).max()))
        assert not np.array_equal(want, got)  # the weights really are the bundle's fp16 records
        assert len(result["nodes"]) == 2 and all(n["requests"] > 0 for n in result["nodes"])
        assert result["expert_bytes_read"] > 0
    for i, half in enumerate(halves):
        service = NodeService(bundle, bundle=True, shard={"count": 2, "index": i}, ram_budget=budget, token=TOKEN,
                              flash_gbps=1.0)  # fmt: skip
        try:
            held = {(h.layer, e) for h in service.info().layers for e in h.experts}
        finally:
            service.close()
        assert held == {(s.layer, e) for s in manifest.layers for e in s.experts if e % 2 == i}, half


def _compute(service: NodeService, layer: int, experts: list[int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(experts), service.hidden_size)).astype(np.float32)
    req = pb.ComputeRequest(
        layer=layer,
        x=encode_numpy(x),
        rows=encode_numpy(np.arange(len(experts), dtype=np.int32)),
        experts=encode_numpy(np.array(experts, dtype=np.int32)),
    )
    return to_numpy(service.compute(req).y)


@pytest.mark.parametrize("target", ["iOS18", "iOS26"])
def test_quantized_bundle_node_matches_the_store_node(models, tmp_path, target):
    """Affine 4-bit experts: iOS 18 bundles keep the packed words, iOS 26 ones hold int8 values that the
    node re-packs; both compute like the store's node up to the fp16 rounding of scales and biases."""
    _, store = models.get("qwen3_moe", "affine4")
    bundle = tmp_path / f"q4-{target}.flashmesh-ios"
    export_ios(store, bundle, target=target, context=16, prefill=4, show_progress=False)
    manifest = Manifest.load(store)
    kwargs = dict(ram_budget=manifest.expert_bytes_total, token=TOKEN, flash_gbps=1.0)
    from_store, from_bundle = NodeService(store, **kwargs), NodeService(bundle, bundle=True, **kwargs)
    try:
        assert from_bundle.info().fingerprint == from_store.info().fingerprint
        spec = manifest.layers[-1]
        experts = list(range(0, spec.num_experts, 3))
        want, got = _compute(from_store, spec.layer, experts), _compute(from_bundle, spec.layer, experts)
        assert np.abs(want - got).max() <= FP16_WEIGHTS_RTOL * max(1.0, float(np.abs(want).max()))
    finally:
        from_store.close()
        from_bundle.close()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int8_values_repack_into_mlx_affine_words(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    packed, _, _ = mx.quantize(w, group_size=32, bits=bits)
    values = unpack_affine(np.array(packed), bits).astype(np.int16) - INT8_OFFSET.get(bits, 0)  # as the bundle holds
    repacked = pack_affine((mx.array(values.astype(np.int8)).astype(mx.int16) + INT8_OFFSET.get(bits, 0)), bits)
    np.testing.assert_array_equal(np.array(repacked), np.array(packed))


def test_tampered_bundle_record_is_an_error_naming_the_expert(bundles, tmp_path):
    store, bundle = _bundle(bundles)
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    spec = BundleExpertSource(copy).layer(Manifest.load(store).layers[0].layer)  # the bundle's record size
    path = copy / spec.file
    data = bytearray(path.read_bytes())
    data[3 * spec.record_size + 100] ^= 0xFF  # inside expert 3's record
    path.write_bytes(bytes(data))
    budget = Manifest.load(store).expert_bytes_total
    service = NodeService(copy, bundle=True, ram_budget=budget, token=TOKEN, flash_gbps=1.0)
    try:
        with pytest.raises(RequestError) as e:
            _compute(service, spec.layer, [3])
        # DATA_LOSS (not INTERNAL): the coordinator moves this record to a replica
        assert e.value.kind == ErrorKind.DATA_LOSS and f"layer {spec.layer} expert 3" in str(e.value)
        assert "checksum" in str(e.value) and "re-export the bundle" in str(e.value)
    finally:
        service.close()


def test_serve_refuses_a_bundle_given_as_store(bundles, capsys):
    _, bundle = _bundle(bundles)
    code = main(["node", "serve", str(bundle), "--ram-budget", "1GB", "--token", TOKEN, "--no-advertise"])
    assert_one_line_error(code, capsys.readouterr().err, "is an iOS bundle", "--bundle")
    code = main(["node", "serve", "--ram-budget", "1GB", "--token", TOKEN, "--no-advertise"])
    assert_one_line_error(code, capsys.readouterr().err, "--bundle")
    store, _ = _bundle(bundles)
    code = main(["node", "serve", str(store), "--count", "2", "--index", "0", "--ram-budget", "1GB", "--token", TOKEN])
    assert_one_line_error(code, capsys.readouterr().err, "flashmesh shard")
    args = ["--bundle", str(bundle), "--count", "2", "--index", "2", "--ram-budget", "1GB", "--token", TOKEN]
    assert_one_line_error(main(["node", "serve", *args]), capsys.readouterr().err, "index")
