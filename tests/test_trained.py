"""The shipped trained model (testing/tiny_moe): checksums verified at load, float32 unpacking."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.protos.errors import UserError
from flashmesh.testing import trained


def test_shipped_model_verifies_and_unpacks_to_float32(tmp_path):
    sums = trained.verify()
    assert trained.WEIGHTS in sums and "config.json" in sums and "tokenizer.json" in sums
    assert (trained.SHIPPED / trained.WEIGHTS).stat().st_size <= 20e6  # the project ships at most ~20 MB
    out = trained.materialize(tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] >= 32 and config["num_hidden_layers"] >= 8
    half = mx.load(str(trained.SHIPPED / trained.WEIGHTS))
    full = mx.load(str(out / "model.safetensors"))
    assert set(half) == set(full)
    name = "model.layers.0.mlp.switch_mlp.up_proj.weight"
    assert full[name].dtype == mx.float32
    np.testing.assert_array_equal(np.array(full[name]), np.array(half[name].astype(mx.float32)))
    assert not list(tmp_path.glob(".*partial*"))


def test_a_damaged_shipped_file_is_refused(tmp_path):
    copy = tmp_path / "tiny_moe"
    shutil.copytree(trained.SHIPPED, copy)
    with open(copy / trained.WEIGHTS, "r+b") as f:  # one flipped byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match="SHA-256"):
        trained.materialize(tmp_path / "model", shipped=copy)
    assert not (tmp_path / "model").exists()
    (copy / trained.CHECKSUMS).unlink()
    with pytest.raises(UserError, match="checksums.json"):
        trained.verify(copy)
