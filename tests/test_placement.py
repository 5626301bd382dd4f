"""Placement, sharding, node request handling and remote dispatch, all without a network."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.engine import attach, load_dense_model, load_store_tokenizer, open_model
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.coordinator.placement import NodeCapacity, place
from flashmesh.coordinator.remote import RemoteExperts
from flashmesh.node.cache import ExpertCache
from flashmesh.node.compute import LocalExperts, expert_templates
from flashmesh.node.service import NodeService, RequestError
from flashmesh.node.shard import shard_experts, write_dense, write_shard
from flashmesh.node.store_format import LayerSpec, Manifest, TensorSpec
from flashmesh.node.store_reader import ExpertStore
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.codec import encode, encode_numpy
from flashmesh.protos.errors import ErrorKind, UserError
from flashmesh.testing.in_process import InProcessLink
from mlx_lm import load

from .conftest import PROMPT, shard_services


def _layers(n_layers=2, n_experts=8, nbytes=1000) -> list[LayerSpec]:
    return [
        LayerSpec(
            layer=i,
            module=f"m.{i}.e",
            num_experts=n_experts,
            record_size=16384,
            tensors=[TensorSpec("w", "float32", (nbytes // 4,), 0, nbytes)],
            experts=[],
            checksums=[],
        )
        for i in range(n_layers)
    ]


def _node(node_id, held_experts, *, layers=2, gbps=1.0, ram=0) -> NodeCapacity:
    return NodeCapacity(node_id, {i: frozenset(held_experts) for i in range(layers)}, gbps, ram)


def _owned(pl, node_id):
    return len(pl.assigned(node_id))


def test_disjoint_shards_place_each_expert_on_its_holder():
    nodes = [_node(f"n{i}", shard_experts(8, count=3, index=i)) for i in range(3)]
    pl = place(_layers(), nodes)
    for layer in range(2):
        for e in range(8):
            assert pl.node_of(layer, e) == f"n{e % 3}"
    assert pl.replicas == {}


def test_replicas_are_kept_as_alternatives_and_load_is_balanced():
    nodes = [_node(f"n{i}", shard_experts(8, count=3, index=i, replicas=2)) for i in range(3)]
    pl = place(_layers(), nodes)
    assert sorted(_owned(pl, f"n{i}") for i in range(3)) == [5, 5, 6]
    for (layer, e), alternatives in pl.replicas.items():
        holders = {n.node_id for n in nodes if e in n.held[layer]}
        assert set(alternatives) | {pl.node_of(layer, e)} == holders and pl.node_of(layer, e) not in alternatives
    assert len(pl.replicas) == 16


def test_faster_flash_takes_more_experts():
    everything = range(64)
    pl = place(
        _layers(n_layers=1, n_experts=64),
        [_node("fast", everything, layers=1, gbps=3.0), _node("slow", everything, layers=1, gbps=1.0)],
    )
    assert _owned(pl, "fast") == 48 and _owned(pl, "slow") == 16


def test_ram_budget_counts_too():
    """Equal flash; one node can cache 32 experts: it takes those plus half of what must stream."""
    layers = _layers(n_layers=1, n_experts=64)
    pl = place(layers, [_node("big", range(64), layers=1, ram=32_000), _node("small", range(64), layers=1, ram=0)])
    assert _owned(pl, "big") == 48 and _owned(pl, "small") == 16


def test_unheld_experts_are_a_one_line_error():
    nodes = [_node("n0", shard_experts(8, count=3, index=0)), _node("n1", shard_experts(8, count=3, index=1))]
    with pytest.raises(UserError, match=r"held by no node.*layer 0 experts \[2, 5\]"):
        place(_layers(), nodes)
    with pytest.raises(UserError, match="no nodes"):
        place(_layers(), [])


def test_shard_store_holds_its_subset(models, tmp_path):
    _, store = models.get("qwen3_moe")
    full = Manifest.load(store)
    held = set()
    for i in range(3):
        m = write_shard(store, tmp_path / f"s{i}", count=3, index=i)
        assert m.shard == {"index": i, "count": 3, "replicas": 1} and m.fingerprint == full.fingerprint
        assert m.dense_files == [] and not list((tmp_path / f"s{i}").glob("*.safetensors"))
        with ExpertStore(tmp_path / f"s{i}") as shard, ExpertStore(store) as source:
            for spec in m.layers:
                assert spec.experts == shard_experts(spec.num_experts, count=3, index=i)
                for e in spec.experts:
                    assert shard.read_raw(spec.layer, e) == source.read_raw(spec.layer, e)
                held |= {(spec.layer, e) for e in spec.experts}
    assert len(held) == sum(s.num_experts for s in full.layers)  # disjoint and complete
    with pytest.raises(UserError, match="shard"):
        open_model(ModelOptions(store=tmp_path / "s0", ram_budget=full.expert_bytes_total))
    dense = write_dense(store, tmp_path / "dense")
    assert all(s.experts == [] for s in dense.layers) and dense.fingerprint == full.fingerprint
    assert all(f.stat().st_size == 0 for f in (tmp_path / "dense" / "experts").iterdir())
    with pytest.raises(UserError, match="--index"):
        write_shard(store, tmp_path / "bad", count=3, index=3)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_remote_dispatch_in_process_is_bit_exact(models, tmp_path, arch):
    src, store = models.get(arch)
    services = shard_services(store, tmp_path)
    try:
        manifest = Manifest.load(store)
        write_dense(store, tmp_path / "dense")
        model, _, _ = load_dense_model(tmp_path / "dense")
        backend = RemoteExperts(
            {s.node_id: InProcessLink(s, s.name) for s in services},
            place(manifest.layers, [NodeCapacity.of(s.info()) for s in services]),
        )
        attach(model, backend, lookahead=True)
        tokenizer = load_store_tokenizer(tmp_path / "dense", manifest)
        prompt = tokenizer.encode(PROMPT)
        ref_model, _ = load(str(src))
        assert (
            generate(model, tokenizer, prompt, SamplingParams(max_tokens=8)).tokens
            == generate(ref_model, tokenizer, prompt, SamplingParams(max_tokens=8)).tokens
        )
        ours = model(mx.array(prompt)[None])[0, -1]
        ref = ref_model(mx.array(prompt)[None])[0, -1]
        np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=0, atol=1e-5)
        # one request per node per MoE layer call, never one per expert
        per_call = backend.dispatch.requests / backend.dispatch.layer_calls
        assert 1 < per_call <= 3
        assert sum(s.stats().requests for s in services) == backend.dispatch.requests
        # the router lookahead's hints rode along: the nodes read ahead, and some of it was used
        assert sum(s.stats().prefetched for s in services) > 0
        assert sum(s.stats().prefetch_used for s in services) > 0
    finally:
        for s in services:
            s.close()


def test_one_layer_matches_local_experts_exactly(models, tmp_path):
    _, store = models.get("qwen3_moe")
    services = shard_services(store, tmp_path)
    manifest = Manifest.load(store)
    local_store = ExpertStore(store)
    try:
        local = LocalExperts(
            ExpertCache(local_store, budget_bytes=manifest.expert_bytes_total), expert_templates(store)
        )
        remote = RemoteExperts(
            {s.node_id: InProcessLink(s) for s in services},
            place(manifest.layers, [NodeCapacity.of(s.info()) for s in services]),
        )
        layer = manifest.layers[0].layer
        x = mx.random.normal((5, 64))  # [N, D]
        idx = mx.array(np.stack([np.random.default_rng(i).choice(16, 4, replace=False) for i in range(5)]))  # [N, k]
        assert mx.array_equal(remote.compute(layer, x, idx), local.compute(layer, x, idx)).item()
        remote.prefetch(layer, list(range(16)))
        assert all(s.cache.stats.bytes_read > 0 for s in services)
    finally:
        local_store.close()
        for s in services:
            s.close()


def test_node_validates_requests(models, tmp_path):
    _, store = models.get("qwen3_moe")
    (service,) = shard_services(store, tmp_path, count=1)
    write_shard(store, tmp_path / "half", count=2, index=0)
    half = NodeService(tmp_path / "half", ram_budget=10**8, token="t", name="half", flash_gbps=1.0)
    try:
        with pytest.raises(RequestError) as e:
            service.check_token("wrong")
        assert e.value.kind == ErrorKind.UNAUTHENTICATED
        service.check_token("secret")
        x = encode(mx.zeros((2, 64)))
        good = dict(
            layer=0,
            x=x,
            rows=encode_numpy(np.array([0, 1], np.int32)),
            experts=encode_numpy(np.array([2, 4], np.int32)),
        )
        assert half.compute(pb.ComputeRequest(**good)).y.shape == [2, 64]
        bad = [
            ({"layer": 99}, "not a MoE layer"),
            ({"experts": encode_numpy(np.array([2, 3], np.int32))}, r"experts \[3\] are not held"),
            ({"experts": encode_numpy(np.array([2, 400], np.int32))}, "not held"),
            ({"rows": encode_numpy(np.array([0, 2], np.int32))}, "rows must index"),
            ({"rows": encode_numpy(np.array([0, 1], np.int64))}, "int32"),
            ({"x": encode(mx.zeros((2, 63)))}, r"\[M, 64\]"),
            ({"x": encode(mx.zeros((2, 64), dtype=mx.int32))}, "float"),
            ({"x": pb.Tensor(dtype="float32", shape=[2, 64], data=b"123")}, "needs 512 bytes"),
            (
                {"rows": encode_numpy(np.zeros(9, np.int32)), "experts": encode_numpy(np.full(9, 2, np.int32))},
                "exceeds top-k",
            ),
            ({"next": pb.PrefetchRequest(layer=1, experts=[3])}, "hint names experts not held"),
            ({"next": pb.PrefetchRequest(layer=77, experts=[2])}, "not a MoE layer"),
        ]
        for change, needle in bad:
            with pytest.raises(RequestError, match=needle) as e:
                half.compute(pb.ComputeRequest(**{**good, **change}))
            assert e.value.kind == ErrorKind.INVALID_ARGUMENT
        half.max_message_bytes = 100
        with pytest.raises(RequestError, match="exceeds this node's limit"):
            half.compute(pb.ComputeRequest(**good))
        half.max_message_bytes = 10**8
        assert half.compute(pb.ComputeRequest(**good)).y.shape == [2, 64]  # still serving
        hinted = half.compute(pb.ComputeRequest(**good, next=pb.PrefetchRequest(layer=1, experts=[0, 2])))
        assert hinted.y.shape == [2, 64]
        assert half.stats().rejected == len(bad) + 1 and half.stats().requests == 3
    finally:
        service.close()
        half.close()


def test_shard_cli(models, tmp_path, capsys):
    from flashmesh.coordinator.cli import main

    _, store = models.get("qwen3_moe")
    assert main(["shard", str(store), str(tmp_path / "s1"), "--count", "2", "--index", "1", "--replicas", "2"]) == 0
    assert "wrote shard 1 of 2" in capsys.readouterr().err
    m = Manifest.load(tmp_path / "s1")
    assert m.shard == {"index": 1, "count": 2, "replicas": 2} and m.layers[0].experts == list(range(16))
    assert main(["shard", str(store), str(tmp_path / "d"), "--dense"]) == 0
    assert Manifest.load(tmp_path / "d").shard == {"dense_only": True}
    assert main(["shard", str(store), str(tmp_path / "d"), "--dense"]) == 2  # exists: one-line error
    assert "--force" in capsys.readouterr().err
    assert main(["shard", str(tmp_path / "s1"), str(tmp_path / "again"), "--count", "2", "--index", "0"]) == 2
    assert "itself a shard" in capsys.readouterr().err
