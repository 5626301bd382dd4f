"""The store format: alignment, checksums, sizes, atomic writes."""

from __future__ import annotations

import os

from flashmesh.node.store_format import RECORD_ALIGN, TENSOR_ALIGN, Manifest, checksum, layout_record
from flashmesh.node.store_reader import ExpertStore
from flashmesh.protos.sizes import parse_bytes
from hypothesis import given
from hypothesis import strategies as st

tensor = st.tuples(
    st.sampled_from(["float32", "uint32", "bfloat16"]),
    st.lists(st.integers(1, 64), min_size=1, max_size=3),
    st.integers(1, 10**6),
)


@given(st.dictionaries(st.text("abcdefgh._", min_size=1, max_size=12), tensor, min_size=1, max_size=8))
def test_record_layout_is_aligned_and_disjoint(tensors):
    specs, record_size = layout_record({k: (d, tuple(s), n) for k, (d, s, n) in tensors.items()})
    assert record_size % RECORD_ALIGN == 0
    end = 0
    for spec in sorted(specs, key=lambda s: s.offset):
        assert spec.offset % TENSOR_ALIGN == 0 and spec.offset >= end
        end = spec.offset + spec.nbytes
    assert end <= record_size


def test_packed_store_layout(models):
    _, store = models.get("deepseek_v3")
    manifest = Manifest.load(store)
    assert [s.layer for s in manifest.layers] == [1, 2]  # first_k_dense_replace = 1: layer 0 is dense
    for spec in manifest.layers:
        size = os.path.getsize(store / spec.file)
        assert size == spec.num_experts * spec.record_size
        assert spec.record_size % RECORD_ALIGN == 0
        with ExpertStore(store) as reader:
            for e in (0, spec.num_experts - 1):
                assert spec.record_offset(e) % RECORD_ALIGN == 0
                assert checksum(reader.read_raw(spec.layer, e)) == spec.record_checksum(e)
    assert len(manifest.fingerprint) == 32
    assert not (store / "experts" / "missing").exists()


def test_repacking_is_deterministic(models, tmp_path):
    from flashmesh.node.store_writer import pack

    src, store = models.get("qwen3_moe")
    again = pack(str(src), tmp_path / "again", show_progress=False)
    assert again.fingerprint == Manifest.load(store).fingerprint


def test_dense_weights_exclude_experts(models):
    import mlx.core as mx

    _, store = models.get("mixtral")
    manifest = Manifest.load(store)
    keys = set()
    for name in manifest.dense_files:
        keys |= set(mx.load(str(store / name)).keys())
    assert not [k for k in keys if any(k.startswith(s.module + ".") for s in manifest.layers)]
    assert any("self_attn" in k for k in keys)


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5g") == int(1.5 * 2**30)
    assert parse_bytes("1048576") == 1048576


def test_prefetch_warms_the_cache(models):
    from flashmesh.coordinator.engine import open_model
    from flashmesh.coordinator.options import ModelOptions

    _, store = models.get("qwen3_moe")
    streaming = open_model(ModelOptions(store=store, ram_budget=Manifest.load(store).expert_bytes_total))
    try:
        layer = streaming.manifest.layers[0].layer
        streaming.backend.prefetch(layer, [3, 1, 3])
        assert (layer, 1) in streaming.cache and (layer, 3) in streaming.cache
        assert streaming.cache.stats.bytes_read == 2 * streaming.manifest.layers[0].record_size
    finally:
        streaming.close()
