"""Tiny random MoE models built from mlx-lm's own classes, packed once per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite never reads or writes the user's own cluster config or model cache (subprocesses inherit these).
_ISOLATED = tempfile.mkdtemp(prefix="flashmesh-tests-")
os.environ["FLASHMESH_CONFIG_DIR"] = os.path.join(_ISOLATED, "config")
os.environ["FLASHMESH_CACHE_DIR"] = os.path.join(_ISOLATED, "cache")
atexit.register(shutil.rmtree, _ISOLATED, ignore_errors=True)

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
