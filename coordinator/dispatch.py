"""The expert dispatch that replaces mlx-lm's routed-expert modules in a built model.

`ExpertDispatch` has SwitchGLU's call signature, (x [..., D], indices [..., k]) -> [..., k, D],
and hands the work to an `ExpertBackend`: in-process (node.compute.LocalExperts) or remote nodes.
Routing, score weighting and shared experts stay in mlx-lm's own MoE block, untouched.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from node.experts import find_expert_modules, layer_index


class ExpertBackend(Protocol):
    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, D], indices [N, k] -> per-pair expert outputs [N, k, D]."""
        ...

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """A hint that `experts` of `layer` will be needed soon; may be ignored."""
        ...


class ExpertDispatch(nn.Module):
    def __init__(self, layer: int, backend: ExpertBackend) -> None:
        super().__init__()
        self.layer = layer
        self.backend = backend

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        lead, k, d = indices.shape[:-1], indices.shape[-1], x.shape[-1]
        y = self.backend.compute(self.layer, x.reshape(-1, d), indices.reshape(-1, k))  # [N, k, D]
        return y.reshape(*lead, k, d)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parts = path.split(".")
    parent = root
    for part in parts[:-1]:
        parent = parent[int(part)] if part.isdigit() else parent[part]
    parent[parts[-1]] = module


def install_dispatch(model: nn.Module, backend: ExpertBackend) -> dict[int, nn.Module]:
    """Replace every routed-expert module with an ExpertDispatch; return layer -> the module replaced."""
    replaced = {}
    for path, module in find_expert_modules(model).items():
        layer = layer_index(path)
        _set_submodule(model, path, ExpertDispatch(layer, backend))
        replaced[layer] = module
    return replaced
