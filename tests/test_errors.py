"""Every error a user can cause ends as one line naming the fix, exit status 2, no traceback,
and never leaves a half-written store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flashmesh.node.store_format import MANIFEST, Manifest
from flashmesh.testing.synthetic import build_model

from .conftest import assert_one_line_error, run_cli


def no_partial_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


def test_dense_model_is_refused(tmp_path, capsys):
    import json as _json

    import mlx.core as mx
    from flashmesh.testing.synthetic import build_tokenizer
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    src = tmp_path / "dense"
    src.mkdir()
    vocab = build_tokenizer(src)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(src / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (src / "config.json").write_text(_json.dumps(config))
    code, _, err = run_cli(capsys, "pack", src, tmp_path / "out")
    assert_one_line_error(code, err, "dense model", "Mixture-of-Experts")
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)


def test_missing_safetensors(tmp_path, capsys):
    src = build_model(tmp_path / "m", "qwen3_moe")
    (src / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, "pack", src, tmp_path / "out")
    assert_one_line_error(code, err, "safetensors")
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)


def test_truncated_safetensors(tmp_path, capsys):
    src = build_model(tmp_path / "m", "qwen3_moe")
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    code, _, err = run_cli(capsys, "pack", src, tmp_path / "out")
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)


def test_unknown_model_type(tmp_path, capsys):
    src = build_model(tmp_path / "m", "qwen3_moe")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "not_a_real_arch"
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "pack", src, tmp_path / "out")
    assert_one_line_error(code, err, "not_a_real_arch", "mlx-lm")


def test_missing_source_directory(tmp_path, capsys):
    code, _, err = run_cli(capsys, "pack", tmp_path / "nope", tmp_path / "out")
    assert_one_line_error(code, err, "does not exist")


def test_existing_output_needs_force(models, tmp_path, capsys):
    src, _ = models.get("qwen3_moe")
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "pack", src, tmp_path / "out")
    assert_one_line_error(code, err, "--force")


def test_interrupted_pack_leaves_no_store(models, tmp_path, monkeypatch):
    import flashmesh.node.store_writer as writer

    src, _ = models.get("qwen3_moe")
    calls = {"n": 0}
    real = writer._write_layer

    def dies_on_second_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_layer", dies_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        writer.pack(str(src), tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)


def _copy_store(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy


def test_corrupt_record_names_layer_and_expert(models, tmp_path, capsys):
    _, store = models.get("qwen3_moe")
    store = _copy_store(store, tmp_path)
    spec = Manifest.load(store).layers[1]
    with open(store / spec.file, "r+b") as f:  # flip one byte inside expert 5's record
        f.seek(spec.record_offset(5) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    # Budget for everything; a prompt long enough that every expert of layer 1 is routed to.
    code, _, err = run_cli(capsys, "run", store, "--prompt", "The quick brown fox " * 20, "--max-tokens", "2", "--json")
    assert_one_line_error(code, err, f"layer {spec.layer} expert 5", "checksum")


def test_budget_below_minimum_gives_the_minimum(models, capsys):
    _, store = models.get("qwen3_moe")
    minimum = Manifest.load(store).min_budget_bytes
    code, _, err = run_cli(capsys, "run", store, "--prompt", "hi", "--ram-budget", str(minimum - 1))
    assert_one_line_error(code, err, "minimum", f"--ram-budget {minimum}")


def test_unreadable_budget(models, capsys):
    _, store = models.get("qwen3_moe")
    code, _, err = run_cli(capsys, "run", store, "--prompt", "hi", "--ram-budget", "lots")
    assert_one_line_error(code, err, "2GB")


def test_other_format_version(models, tmp_path, capsys):
    _, store = models.get("qwen3_moe")
    store = _copy_store(store, tmp_path)
    manifest = json.loads((store / MANIFEST).read_text())
    manifest["format_version"] = 999
    (store / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "run", store, "--prompt", "hi")
    assert_one_line_error(code, err, "format 999", "re-pack")


def test_not_a_store(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", tmp_path, "--prompt", "hi")
    assert_one_line_error(code, err, "flashmesh pack")


def test_truncated_expert_file(models, tmp_path, capsys):
    _, store = models.get("qwen3_moe")
    store = _copy_store(store, tmp_path)
    spec = Manifest.load(store).layers[0]
    with open(store / spec.file, "r+b") as f:
        f.truncate(spec.record_size * 3)
    code, _, err = run_cli(capsys, "run", store, "--prompt", "hi")
    assert_one_line_error(code, err, "truncated")


def test_console_script_reports_without_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "flashmesh.coordinator.cli", "run", str(tmp_path), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "flashmesh pack" in proc.stderr
