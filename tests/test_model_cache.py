"""`flashmesh run MODEL_DIR` / hub id: packed into the cache on first use, reused after, listed and removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from flashmesh.node.store_format import MANIFEST


def flashmesh(*args, cache, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "FLASHMESH_CACHE_DIR": str(cache), "COLUMNS": "80", **env}
    return subprocess.run(
        [sys.executable, "-m", "flashmesh.coordinator.cli", *map(str, args)],
        capture_output=True, text=True, timeout=600, env=full,
    )  # fmt: skip


def test_run_a_model_directory_packs_once(models, tmp_path):
    src, store = models.get("qwen3_moe")
    cache = tmp_path / "cache"
    run = ("run", src, "--prompt", "Hello", "--max-tokens", "5", "--json")
    first = flashmesh(*run, cache=cache)
    assert first.returncode == 0, first.stderr
    assert "packing" in first.stderr
    reference = flashmesh("run", store, "--prompt", "Hello", "--max-tokens", "5", "--json", cache=cache)
    assert json.loads(first.stdout)["tokens"] == json.loads(reference.stdout)["tokens"]
    (cached,) = [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]
    manifest_mtime = (cached / MANIFEST).stat().st_mtime_ns

    again = flashmesh(*run, cache=cache)
    assert again.returncode == 0 and "packing" not in again.stderr, again.stderr
    assert (cached / MANIFEST).stat().st_mtime_ns == manifest_mtime

    listed = json.loads(flashmesh("models", "--json", cache=cache).stdout)
    assert [(m["name"], m["source"]) for m in listed] == [(cached.name, str(src))]
    assert listed[0]["bytes"] > 0
    table = flashmesh("models", cache=cache)
    assert table.returncode == 0 and cached.name in table.stdout and str(src) in table.stdout.replace("\n", "")
    assert max(len(line) for line in table.stdout.splitlines()) <= 80

    removed = flashmesh("models", "rm", cached.name, cache=cache)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(flashmesh("models", "--json", cache=cache).stdout) == []
    missing = flashmesh("models", "rm", cached.name, cache=cache)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1


def test_a_changed_source_is_packed_again(models, tmp_path):
    from flashmesh.coordinator.model_cache import source_fingerprint

    src, _ = models.get("qwen3_moe")
    copy = tmp_path / "model"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = source_fingerprint(copy)
    assert source_fingerprint(copy) == before
    later = time.time() + 5
    os.utime(copy / "config.json", (later, later))
    assert source_fingerprint(copy) != before


def test_run_hub_id_offline_is_one_line(tmp_path):
    proc = flashmesh(
        "run", "someorg/some-moe-model", "--prompt", "Hi", cache=tmp_path / "cache",
        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
    )  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "someorg/some-moe-model" in err and "downloaded" in err


def test_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = flashmesh("run", tmp_path / "empty", "--prompt", "Hi", cache=tmp_path / "cache")
    assert proc.returncode == 2 and "neither a flashmesh store nor a model directory" in proc.stderr
