"""`flashmesh demo` and `flashmesh run` as a user runs them: console script, JSON, statistics."""

from __future__ import annotations

import json
import re

from .conftest import flashmesh

RUN_KEYS = {
    "tokens",
    "text",
    "ttft_s",
    "decode_tokens_per_s",
    "cache_hit_rate",
    "expert_bytes_read",
    "ram_budget_bytes",
    "expert_bytes_total",
    "peak_cache_bytes",
}


def test_demo_json(tmp_path):
    proc = flashmesh("demo", "--json", "--workdir", tmp_path / "demo", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert RUN_KEYS | {"tokens_match_reference", "store"} <= set(result)
    assert result["tokens_match_reference"] is True
    # the shipped model trained on English: readable words, no replacement characters
    assert "\ufffd" not in result["text"] and sum(c.isalpha() for c in result["text"]) > len(result["text"]) / 2
    assert result["tls"] is True  # the demo's nodes and coordinator speak mutual TLS
    assert result["ram_budget_bytes"] < result["expert_bytes_total"]
    assert 0 < result["peak_cache_bytes"] <= result["ram_budget_bytes"]
    assert result["expert_bytes_read"] > 0
    # Second run reuses the cached model and store; plaintext gives the same tokens.
    again = flashmesh("demo", "--json", "--workdir", tmp_path / "demo", "--max-tokens", "12", "--no-tls")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["tokens"] == result["tokens"]
    assert json.loads(again.stdout)["tls"] is False
    # The text tables at 80 columns: every node's name and address whole.
    text = flashmesh("demo", "--workdir", tmp_path / "demo", "--max-tokens", "4", env={"COLUMNS": "80"})
    assert text.returncode == 0, text.stderr
    lines = text.stderr.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text.stderr, text.stderr
    names = re.findall(r"local\d+x[0-9a-f]{4}-\d", text.stderr)
    addresses = re.findall(r"127\.0\.0\.1:\d{4,5}", text.stderr)
    assert len(set(names)) == 3 and len(set(addresses)) == 3, text.stderr


def test_pack_then_run(models, tmp_path):
    src, _ = models.get("qwen3_next")
    proc = flashmesh("pack", src, tmp_path / "store")
    assert proc.returncode == 0, proc.stderr
    proc = flashmesh(
        "run", tmp_path / "store", "--prompt", "Hello", "--max-tokens", "5", "--ram-budget", "1MiB", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert RUN_KEYS <= set(result) and len(result["tokens"]) == 5
    assert result["ram_budget_bytes"] == 2**20
    assert result["cache_huge_page_bytes"] == 0  # reported; a 1 MiB cache spans no whole huge page
    assert 0 < result["flash_busy_share"] < 1 and result["flash_busy_seconds"] > 0


def test_run_prints_text_and_table(models):
    _, store = models.get("qwen3_moe")
    proc = flashmesh(
        "run", store, "--prompt", "Hello", "--max-tokens", "4", "--chat", "--temperature", "0.7", "--top-p", "0.9"
    )
    assert proc.returncode == 0, proc.stderr
    for label in ("time to first token", "decode", "cache hit rate", "expert bytes read", "I/O"):
        assert label in proc.stderr
