"""The store's dense weights as float32 numpy arrays (quantized linears dequantized), by mlx-lm name."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import UserError


class DenseWeights:
    """Lazy access to a store's dense tensors; `get(key)` returns float32 [..] (dequantized if needed)."""

    def __init__(self, store: Path, manifest: Manifest) -> None:
        self.store = Path(store)
        self.quantization = manifest.config.get("quantization") or {}
        self._arrays: dict[str, mx.array] = {}
        for name in manifest.dense_files:
            try:
                self._arrays.update(mx.load(str(self.store / name)))
            except (RuntimeError, ValueError, OSError) as e:
                raise UserError(f"{self.store / name} cannot be read ({e}); re-run `flashmesh pack`") from None

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def keys(self) -> list[str]:
        return list(self._arrays)

    def _quant_of(self, module: str) -> dict:
        q = self.quantization.get(module)
        if isinstance(q, dict):
            return {**self.quantization, **q}
        return self.quantization

    def get(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            raise UserError(f"the store has no dense weight {key}; re-run `flashmesh pack`")
        a = self._arrays[key]
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and f"{module}.scales" in self._arrays:
            q = self._quant_of(module)
            if q.get("mode", "affine") != "affine":
                raise UserError(f"export-ios cannot express {q.get('mode')} quantization (dense weight {key})")
            a = mx.dequantize(
                a,
                self._arrays[f"{module}.scales"],
                self._arrays.get(f"{module}.biases"),
                group_size=q["group_size"],
                bits=q["bits"],
            )
        return np.asarray(a.astype(mx.float32))
