"""export-ios and verify-bundle: the bundle's structure, checksums, round trip and refusal of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flashmesh.coordinator.cli import main
from flashmesh.mobile_export.verify import verify_bundle
from flashmesh.node.store_format import RECORD_ALIGN

ARCHS = ["qwen3_moe", "deepseek_v3"]
SHAPE = {"layers": 3}


@pytest.mark.parametrize("arch", ARCHS)
def test_bundle_verifies_against_store(bundles, arch):
    root, built = bundles
    store, manifest = built[arch]
    report = verify_bundle(root / f"{arch}.flashmesh-ios", store=store)
    assert report.ok, report.errors
    assert report.checks["records equal to the store, bit for bit"] == sum(
        len(s["experts"]) for s in manifest["layers"]
    )
    assert report.checks["weights equal to the store, bit for bit"] > 0
    assert all(s["record_size"] % RECORD_ALIGN == 0 for s in manifest["layers"])
    kernel = manifest["coreml"]["kernel"]["functions"]
    assert set(kernel) == {"decode", "prefill"}
    assert any(f["states"] for p in manifest["coreml"]["packages"] for f in p["functions"].values())


def test_cli_export_and_verify_json(models, tmp_path, capsys):
    _, store = models.get("qwen3_moe", "fp32", **SHAPE)
    out = tmp_path / "cli.flashmesh-ios"
    args = ["export-ios", store, out, "--chunks", "2", "--context", "32", "--prefill", "4", "--json"]
    assert main([str(a) for a in args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["packages"]) == 3  # two dense chunks + the kernel
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind
    assert main(["verify-bundle", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def _tampered(bundles, tmp_path) -> Path:
    root, _ = bundles
    copy = tmp_path / "t.flashmesh-ios"
    shutil.copytree(root / "qwen3_moe.flashmesh-ios", copy)
    return copy


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_record_byte_names_layer_and_expert(bundles, tmp_path, capsys):
    b = _tampered(bundles, tmp_path)
    size = bundles[1]["qwen3_moe"][1]["layers"][1]["record_size"]
    _flip(b / "experts/layer_001.bin", 3 * size + 100)  # inside expert 3's record
    assert main(["verify-bundle", str(b)]) == 2
    assert "experts/layer_001.bin: layer 1 expert 3 record checksum mismatch" in capsys.readouterr().err


def test_truncated_record_file(bundles, tmp_path, capsys):
    b = _tampered(bundles, tmp_path)
    path = b / "experts/layer_002.bin"
    path.write_bytes(path.read_bytes()[:-RECORD_ALIGN])
    assert main(["verify-bundle", str(b)]) == 2
    assert "experts/layer_002.bin" in capsys.readouterr().err


def test_edited_manifest_names_section(bundles, tmp_path, capsys):
    b = _tampered(bundles, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["routing"]["top_k"] += 1
    (b / "manifest.json").write_text(json.dumps(m))
    assert main(["verify-bundle", str(b)]) == 2
    assert "manifest.json: section 'routing' was edited" in capsys.readouterr().err


def test_flipped_package_weight(bundles, tmp_path, capsys):
    b = _tampered(bundles, tmp_path)
    _flip(b / "coreml/dense_00.mlpackage/Data/com.apple.CoreML/weights/weight.bin", 200)
    assert main(["verify-bundle", str(b)]) == 2
    assert (
        "coreml/dense_00.mlpackage/Data/com.apple.CoreML/weights/weight.bin: checksum mismatch"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("arch", "quant", "words"), [("gpt_oss", "fp32", "model_type 'gpt_oss'"), ("qwen3_moe", "mxfp4", "mxfp4")]
)
def test_unsupported_is_one_line(models, tmp_path, capsys, arch, quant, words):
    _, store = models.get(arch, quant, layers=2)
    assert main(["export-ios", str(store), str(tmp_path / "x.flashmesh-ios")]) == 2
    err = capsys.readouterr().err.strip()
    assert "export-ios cannot express" in err and words in err and "\n" not in err
    assert not (tmp_path / "x.flashmesh-ios").exists()
