"""Tiny random MoE models built from mlx-lm's own classes, packed once per test session, and the
helpers several test files share (running the CLI, the one-line error check, the local reference run)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite never reads or writes the user's own cluster config or model cache (subprocesses inherit these).
_ISOLATED = tempfile.mkdtemp(prefix="flashmesh-tests-")
os.environ["FLASHMESH_CONFIG_DIR"] = os.path.join(_ISOLATED, "config")
os.environ["FLASHMESH_CACHE_DIR"] = os.path.join(_ISOLATED, "cache")
atexit.register(shutil.rmtree, _ISOLATED, ignore_errors=True)

from flashmesh.coordinator.cli import main  # noqa: E402
from flashmesh.coordinator.engine import open_model  # noqa: E402
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate  # noqa: E402
from flashmesh.coordinator.options import ModelOptions  # noqa: E402
from flashmesh.node.service import NodeService  # noqa: E402
from flashmesh.node.shard import write_shard  # noqa: E402
from flashmesh.node.store_format import Manifest  # noqa: E402
from flashmesh.node.store_writer import pack  # noqa: E402
from flashmesh.testing.synthetic import build_model  # noqa: E402
from mlx_lm import load  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. Mixture of experts"
ARCHS = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen3_next"]
QUANTS = {
    "fp32": None,
    "affine4": {"bits": 4, "group_size": 64, "mode": "affine"},
    "affine8": {"bits": 8, "group_size": 32, "mode": "affine"},
    "mxfp4": {"bits": 4, "group_size": 32, "mode": "mxfp4"},
}


class ModelFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple, tuple[Path, Path]] = {}

    def get(self, arch: str, quant: str = "fp32", **shape) -> tuple[Path, Path]:
        """(source model dir, packed store) for an architecture and quantization, built once."""
        key = (arch, quant, tuple(sorted(shape.items())))
        if key not in self._built:
            name = f"{arch}-{quant}-" + "-".join(f"{k}{v}" for k, v in sorted(shape.items()))
            src = build_model(self.root / f"{name}-src", arch, quantize=QUANTS[quant], **shape)
            store = self.root / f"{name}-store"
            pack(str(src), store, show_progress=False)
            self._built[key] = (src, store)
        return self._built[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> ModelFactory:
    return ModelFactory(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def bundles(models, tmp_path_factory):
    """iPhone bundles of the 3-layer qwen3_moe and deepseek_v3 stores, exported once per session:
    (root, {arch: (store, bundle manifest)}), bundle at root / f"{arch}.flashmesh-ios"."""
    from flashmesh.mobile_export.exporter import export_ios

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for arch in ("qwen3_moe", "deepseek_v3"):
        _, store = models.get(arch, "fp32", layers=3)
        out[arch] = (
            store,
            export_ios(store, root / f"{arch}.flashmesh-ios", context=64, prefill=8, show_progress=False),
        )
    return root, out


def flashmesh(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """The console script as a user runs it, in its own process (`env`: more environment)."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flashmesh.coordinator.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`flashmesh ARGS` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def local_tokens(store: Path, *, max_tokens: int = 10, prompt: str = PROMPT) -> list[int]:
    """Greedy tokens of the whole store run in this process, every expert cached: the reference of
    the distributed runs."""
    streaming = open_model(ModelOptions(store=store, ram_budget=Manifest.load(store).expert_bytes_total))
    try:
        tokens = encode_prompt(streaming.tokenizer, prompt, chat=False)
        return generate(streaming.model, streaming.tokenizer, tokens, SamplingParams(max_tokens=max_tokens)).tokens
    finally:
        streaming.close()


def _budget(manifest: Manifest, which: str) -> int:
    return {
        "all": manifest.expert_bytes_total,
        "quarter": max(manifest.expert_bytes_total // 4, manifest.min_budget_bytes),
        "minimum": manifest.min_budget_bytes,
    }[which]


def check_equivalence(src, store, budget_name: str, *, max_tokens: int = 12) -> None:
    ref_model, tokenizer = load(str(src))
    prompt = tokenizer.encode(PROMPT)
    reference = generate(ref_model, tokenizer, prompt, SamplingParams(max_tokens=max_tokens))
    manifest = Manifest.load(store)
    budget = _budget(manifest, budget_name)
    streaming = open_model(ModelOptions(store=store, ram_budget=budget))
    try:
        ours = generate(streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=max_tokens))
        assert ours.tokens == reference.tokens
        ref_logits = ref_model(mx.array(prompt)[None])[0, -1].astype(mx.float32)
        our_logits = streaming.model(mx.array(prompt)[None])[0, -1].astype(mx.float32)
        atol = 0.0 if budget_name != "minimum" else 1e-4
        np.testing.assert_allclose(np.array(our_logits), np.array(ref_logits), rtol=0, atol=atol)
        stats = streaming.cache.stats
        assert stats.peak_bytes <= budget
        assert stats.misses > 0
        if budget_name == "minimum":
            assert stats.evictions > 0
    finally:
        streaming.close()


def shard_services(store, tmp_path, *, count=3, budget_factor=2, token="secret") -> list:
    """In-process nodes (NodeService) over `count` disjoint shards of `store` written under `tmp_path`."""
    m = Manifest.load(store)
    services = []
    for i in range(count):
        write_shard(store, tmp_path / f"s{i}", count=count, index=i)
        services.append(
            NodeService(
                tmp_path / f"s{i}",
                ram_budget=m.min_budget_bytes * budget_factor,
                token=token,
                name=f"n{i}",
                flash_gbps=1.0,
            )
        )
    return services


@pytest.fixture(scope="session")
def swift_bundles(models, bundles, tmp_path_factory):
    """The bundles the Swift node is tested on (names of flashmesh.testing.swift_vectors.BUNDLES) ->
    (store, bundle): the fp16 ones above, and 4-bit qwen3_moe experts exported for iOS 18 (packed
    words, CPU dequantization) and iOS 26 (int8)."""
    from flashmesh.mobile_export.exporter import export_ios

    root, built = bundles
    out = {f"{arch}-fp16": (built[arch][0], root / f"{arch}.flashmesh-ios") for arch in ("qwen3_moe", "deepseek_v3")}
    work = tmp_path_factory.mktemp("swift-bundles")
    _, q4 = models.get("qwen3_moe", "affine4", layers=3)
    for target in ("iOS18", "iOS26"):
        bundle = work / f"q4-{target}.flashmesh-ios"
        export_ios(q4, bundle, target=target, context=64, prefill=8, show_progress=False)
        out[f"qwen3_moe-q4-{target}"] = (q4, bundle)
    return out


@pytest.fixture(scope="session")
def swift_binary():
    """The Swift node's executable, built (with its unit tests) once per session; without a Swift
    toolchain the tests that need it skip, loudly, or fail when FLASHMESH_REQUIRE_SWIFT is set."""
    from flashmesh.testing.swift_node import node_binary, swift_required

    binary = node_binary()
    if binary is None:
        message = "no Swift toolchain (swift), so the Swift node was not built or tested"
        if swift_required():
            pytest.fail(f"FAILED: {message}; FLASHMESH_REQUIRE_SWIFT is set")
        pytest.skip(f"SKIPPED: {message}")
    return binary
