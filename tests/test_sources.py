"""Sources in the layouts users have: Hugging Face per-expert tensors, hub ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
from flashmesh.node.store_format import Manifest

from .conftest import check_equivalence


def _unstack_experts_hf_style(src, dst) -> None:
    """Rewrite an mlx-lm qwen3_moe directory the way Hugging Face ships it: one tensor per expert."""
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    out = {}
    for name, value in weights.items():
        if ".mlp.switch_mlp." in name:
            prefix, proj = name.split(".switch_mlp.")
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{proj}"] = value[e]
        else:
            out[name] = value
    (dst / "model.safetensors").unlink()
    half = sorted(out)[: len(out) // 2]  # two files, as sharded checkpoints come
    mx.save_safetensors(str(dst / "model-00001-of-00002.safetensors"), {k: out[k] for k in half})
    mx.save_safetensors(str(dst / "model-00002-of-00002.safetensors"), {k: out[k] for k in out if k not in half})


def test_hugging_face_per_expert_layout(models, tmp_path):
    src, store = models.get("qwen3_moe")
    hf = tmp_path / "hf"
    _unstack_experts_hf_style(src, hf)
    from flashmesh.node.store_writer import pack

    packed = pack(str(hf), tmp_path / "store", show_progress=False)
    # mlx-lm's own sanitize stacked the experts: records are byte-identical to the mlx-layout store.
    assert packed.fingerprint == Manifest.load(store).fingerprint
    check_equivalence(hf, tmp_path / "store", "quarter")


def test_hub_id_offline_is_one_line(tmp_path):
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: a fresh process, so no lookup is sent.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run(
        [sys.executable, "-m", "flashmesh.coordinator.cli", "pack", "someorg/some-moe-model", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "someorg/some-moe-model" in err and "downloaded" in err


def test_manifest_keeps_source_config(models):
    src, store = models.get("qwen3_moe")
    source_config = json.loads((src / "config.json").read_text())
    assert Manifest.load(store).config == source_config
    assert Manifest.load(store).top_k == source_config["num_experts_per_tok"]
