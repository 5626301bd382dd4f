"""`run`, `run --cluster` and `serve` take the same model options to the same effect: one parser
(`add_model_args`), one reading (`model_options`), one opener (`open_model`). The effect over TLS
nodes (TLS and the RPC deadline) is checked in test_tls.py, on its TLS cluster."""

from __future__ import annotations

import pytest
from flashmesh.coordinator import options as model_opts
from flashmesh.coordinator.cli import build_parser
from flashmesh.coordinator.dispatch import ExpertDispatch
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.options import ModelOptions, default_budget, model_options
from flashmesh.node.store_format import Manifest
from flashmesh.protos import TLS_ENV
from flashmesh.protos.errors import UserError

FLAG_SETS = {
    "defaults": [],
    "local cache": ["--ram-budget", "3MiB", "--page-cache", "--preload", "--lookahead", "--no-huge-pages"],
    "cluster": [
        "--cluster",
        "--node",
        "127.0.0.1:9",
        "--node",
        "n1@127.0.0.1:10",
        "--tls",
        "/tls/dir",
        "--rpc-deadline",
        "7.5",
        "--token",
        "t",
        "--interfaces",
        "127.0.0.2",
        "--name-prefix",
        "lab-",
        "--expect",
        "2",
        "--discover-timeout",
        "1.5",
        "--lookahead",
    ],  # fmt: skip
    "static nodes only": ["--node", "127.0.0.1:9", "--no-zeroconf", "--token", "t"],
}


def _options(command: str, store, flags: list[str]) -> ModelOptions:
    extra = ["--prompt", "hi"] if command == "run" else []
    return model_options(build_parser().parse_args([command, str(store), *flags, *extra]))


@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_run_and_serve_read_the_same_options(tmp_path, monkeypatch, flags):
    monkeypatch.delenv(TLS_ENV, raising=False)
    assert _options("run", tmp_path, flags) == _options("serve", tmp_path, flags)


def test_the_cluster_flags_mean_what_they_say(tmp_path, monkeypatch):
    monkeypatch.delenv(TLS_ENV, raising=False)
    o = _options("serve", tmp_path, FLAG_SETS["cluster"])
    assert o.cluster and o.nodes == ("127.0.0.1:9", "n1@127.0.0.1:10") and o.zeroconf == ("127.0.0.2",)
    assert str(o.tls) == "/tls/dir" and o.rpc_deadline == 7.5 and o.token == "t" and o.lookahead
    assert (o.name_prefix, o.expect, o.discover_timeout) == ("lab-", 2, 1.5)
    o = _options("run", tmp_path, FLAG_SETS["static nodes only"])
    assert o.cluster and o.zeroconf is None  # --node alone means the experts run there
    # $FLASHMESH_TLS is the default identity of every command that talks to nodes, and of none other.
    monkeypatch.setenv(TLS_ENV, "/from/env")
    for command in ("run", "serve"):
        assert str(_options(command, tmp_path, ["--cluster"]).tls) == "/from/env"
        assert _options(command, tmp_path, []).tls is None


@pytest.mark.parametrize("command", ["run", "serve"])
@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--cluster", "--ram-budget", "1GB"], "--ram-budget"),
        (
            ["--node", "127.0.0.1:9", "--page-cache", "--preload", "--no-huge-pages"],
            "--page-cache, --preload, --no-huge",
        ),
        (["--tls", "/tls/dir"], "--cluster"),
    ],
)
def test_options_that_would_be_ignored_are_refused(tmp_path, command, flags, needle):
    with pytest.raises(UserError, match=needle):
        _options(command, tmp_path, flags)


def test_the_default_budget_is_every_expert_but_at_most_half_the_ram(models, monkeypatch):
    _, store = models.get("qwen3_moe")
    manifest = Manifest.load(store)
    assert default_budget(manifest) == manifest.expert_bytes_total  # this machine holds the tiny model
    small = manifest.min_budget_bytes + (manifest.expert_bytes_total - manifest.min_budget_bytes) // 2
    monkeypatch.setattr(model_opts, "physical_memory_bytes", lambda: 2 * small)  # a machine with 2x that RAM
    assert default_budget(manifest) == small
    for command in ("run", "serve"):
        streaming = open_model(_options(command, store, []))
        try:
            assert streaming.cache.budget_bytes == small
        finally:
            streaming.close()


@pytest.mark.parametrize("command", ["run", "serve"])
def test_local_options_reach_the_cache_and_the_dispatch(models, command):
    _, store = models.get("qwen3_moe")
    budget = Manifest.load(store).min_budget_bytes * 2
    flags = ["--ram-budget", str(budget), "--page-cache", "--lookahead", "--no-huge-pages"]
    streaming = open_model(_options(command, store, flags))
    try:
        assert streaming.cache.budget_bytes == budget
        assert streaming.store.page_cache
        assert not streaming.cache.slab(streaming.manifest.layers[0].layer).huge_pages
        assert any(m.lookahead is not None for m in streaming.model.modules() if isinstance(m, ExpertDispatch))
        assert streaming.remote is None and streaming.nodes == []
    finally:
        streaming.close()


def _lookahead_on(streaming) -> bool:
    return any(m.lookahead is not None for m in streaming.model.modules() if isinstance(m, ExpertDispatch))


@pytest.mark.parametrize(
    ("shape", "budget", "flags", "expected"),
    [
        ("big", "min", [], True),  # 6 MiB of reads a layer that the cache cannot hold: auto turns it on
        ("big", "all", [], False),  # every expert cached: nothing to read ahead
        ("big", "min", ["--no-lookahead"], False),
        ("small", "min", [], False),  # 192 KiB a layer: the prediction costs more than the reads it hides
        ("small", "min", ["--lookahead"], True),
    ],
)
def test_lookahead_by_default_only_where_the_reads_are_big(models, shape, budget, flags, expected):
    sizes = {"big": {"layers": 2, "experts": 4, "top_k": 2, "expert_hidden": 4096}, "small": {}}
    _, store = models.get("qwen3_moe", "fp32", **sizes[shape])
    manifest = Manifest.load(store)
    bytes_ = manifest.min_budget_bytes if budget == "min" else manifest.expert_bytes_total
    streaming = open_model(_options("run", store, ["--ram-budget", str(bytes_), *flags]))
    try:
        assert streaming.lookahead == _lookahead_on(streaming) == expected
    finally:
        streaming.close()
