"""Every MoE model file of the installed mlx-lm: packed, then streamed with mlx-lm's own tokens.

Each case builds a tiny random model (testing/arch_configs.py), packs it and compares greedy tokens
and the prompt's last logits with mlx-lm on the unpacked model, with every expert in RAM and at
the smallest budget. The logits are expected bit-identical (the same kernels on the same rows);
1e-4 is allowed for a multi-wave prefill, which groups rows differently (see test_equivalence).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.engine import attach, load_dense_model, load_store_tokenizer
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.placement import NodeCapacity, place
from flashmesh.coordinator.remote import RemoteExperts
from flashmesh.node import store_writer
from flashmesh.node.experts import model_classes
from flashmesh.node.shard import write_dense
from flashmesh.node.store_check import verify_store
from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import UserError
from flashmesh.testing.arch_check import (
    BUDGETS,
    build_and_pack,
    expected_statuses,
    reference,
    streamed,
    table_in,
    uncovered,
)
from flashmesh.testing.arch_configs import NOT_CHECKED, REFUSED, TINY_CONFIGS, tiny_config
from flashmesh.testing.in_process import InProcessLink

from .conftest import shard_services

ARCHS = sorted(set(TINY_CONFIGS) - set(REFUSED) - set(NOT_CHECKED))
TOP_K = {"llama4": 1}  # what each tiny config asks for, under whatever key its architecture reads


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """(arch, quant) -> its tiny model and store, built once per module."""
    root = tmp_path_factory.mktemp("archs")
    built = {}

    def get(arch: str, quant: str = "fp32"):
        if (arch, quant) not in built:
            built[arch, quant] = build_and_pack(root, arch, quant=quant)
        return built[arch, quant]

    return get


def test_every_moe_model_file_is_covered_or_refused():
    missing, stale = uncovered()
    assert not missing, f"mlx-lm has MoE model files with no tiny config in testing/arch_configs.py: {missing}"
    assert not stale, f"testing/arch_configs.py names architectures mlx-lm no longer has: {stale}"


@pytest.mark.parametrize("quant", ["fp32", "4bit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_streams_like_mlx_lm(packs, arch, quant):
    packed = packs(arch, quant)
    manifest = Manifest.load(packed.store)
    assert {s.top_k for s in manifest.layers} == {TOP_K.get(arch, 2)}  # read off the model's routing
    if quant == "4bit":
        assert all(any(t.name.endswith(".scales") for t in s.tensors) for s in manifest.layers)
    prompt, ref = reference(packed)
    for which in BUDGETS:
        ours = streamed(packed, prompt, which)
        assert ours.tokens == ref.tokens, which
        np.testing.assert_allclose(ours.logits, ref.logits, rtol=0, atol=1e-4)


def test_attention_switch_linear_stays_dense(packs):
    """deepseek_v41's attention holds a SwitchLinear called with fixed group ids: not an expert bank."""
    packed = packs("deepseek_v41")
    manifest = Manifest.load(packed.store)
    assert [s.module.rsplit(".", 1)[-1] for s in manifest.layers] == ["switch_mlp"] * len(manifest.layers)
    assert len({s.layer for s in manifest.layers}) == len(manifest.layers)
    dense = mx.load(str(packed.store / manifest.dense_files[0]))
    assert any(".self_attn.o_a_proj." in k for k in dense)


def test_list_of_expert_modules_is_one_bank_per_layer(packs):
    packed = packs("dbrx")
    manifest = Manifest.load(packed.store)
    assert {(s.kind, s.num_experts) for s in manifest.layers} == {("list", 8)}
    assert {t.name for t in manifest.layers[0].tensors} == {"w1.weight", "v1.weight", "w2.weight"}


def test_pack_writes_no_store_that_would_not_run(packs, tmp_path, monkeypatch):
    """A bank the writer misses would stay dense (random at run time): the check refuses the store."""
    src = packs("qwen3_moe").source
    real = store_writer.find_expert_banks
    monkeypatch.setattr(store_writer, "find_expert_banks", lambda model: real(model)[:-1])
    out = tmp_path / "never-written"
    with pytest.raises(UserError, match=r"model\.layers\.2\.mlp\.switch_mlp.*nothing was written"):
        store_writer.pack(str(src), out, show_progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["layers"].append(dict(m["layers"][0])), r"layer \d+ has routed experts in .* and "),
        (lambda m: m["layers"][0].update(module="model.layers.0.self_attn"), r"self_attn, which the model does not"),
        (lambda m: m["layers"][0].update(top_k=3), r"entry for model\.layers\.0\.mlp\.switch_mlp"),
        (lambda m: m["layers"][0]["tensors"].pop(), r"records of model\.layers\.0\.mlp\.switch_mlp"),
    ],
)
def test_store_check_names_the_module(packs, tmp_path, edit, message):
    store = packs("qwen3_moe").store
    copy = shutil.copytree(store, tmp_path / "store")
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message):
        verify_store(copy)


def test_docs_table_states_every_model_file():
    """docs/store.md's table (written by `python -m bench.arch_table`) is the one for this mlx-lm."""
    text = (Path(__file__).parents[1] / "docs" / "store.md").read_text()
    assert table_in(text) == expected_statuses(), "run `python -m bench.arch_table` and commit docs/store.md"


def test_refused_for_the_stated_reason():
    """muse_spark: mlx-lm itself cannot run it without Metal. If it ever can here, cover it instead."""
    if mx.metal.is_available():
        pytest.skip("Metal is available: muse_spark needs checking on this machine")
    config = tiny_config("muse_spark", vocab=384)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    with pytest.raises(RuntimeError, match="Metal"):
        mx.eval(model(mx.arange(1, 4)[None]))


@pytest.mark.parametrize("arch", ["dbrx", "deepseek_v41", "gemma4_text"])
def test_remote_nodes_match_mlx_lm(packs, tmp_path, arch):
    """The same banks served by three shard nodes (in process, over the node protocol's messages)."""
    packed = packs(arch)
    services = shard_services(packed.store, tmp_path)
    try:
        manifest = Manifest.load(packed.store)
        write_dense(packed.store, tmp_path / "dense")
        model, _, _ = load_dense_model(tmp_path / "dense")
        links = {s.node_id: InProcessLink(s, s.name) for s in services}
        attach(model, RemoteExperts(links, place(manifest.layers, [NodeCapacity.of(s.info()) for s in services])))
        tokenizer = load_store_tokenizer(tmp_path / "dense", manifest)
        prompt, ref = reference(packed)
        assert generate(model, tokenizer, prompt, SamplingParams(max_tokens=len(ref.tokens))).tokens == ref.tokens
    finally:
        for s in services:
            s.close()
