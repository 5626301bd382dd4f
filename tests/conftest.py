"""Tiny random MoE models built from mlx-lm's own classes, packed once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from flashmesh.node.store_writer import pack  # noqa: E402
from flashmesh.testing.synthetic import build_model  # noqa: E402

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
