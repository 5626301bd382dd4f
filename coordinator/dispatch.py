"""The expert dispatch that replaces mlx-lm's routed-expert modules in a built model.

`ExpertDispatch` has SwitchGLU's call signature, (x [..., D], indices [..., k]) -> [..., k, D],
and hands the work to an `ExpertBackend`: in-process (node.compute.LocalExperts) or remote nodes.
Routing, score weighting and shared experts stay in mlx-lm's own MoE block, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmesh.node.cache_stats import ExpertStats
from flashmesh.node.experts import find_expert_modules, layer_index


class ExpertBackend(Protocol):
    """Where the routed experts of a built model are computed: node.compute.LocalExperts in this
    process, coordinator.remote.RemoteExperts on nodes. Chosen in one place (coordinator.engine)."""

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, D], indices [N, k] -> per-pair expert outputs [N, k, D]."""
        ...

    def hint(self, layer: int, experts: list[int]) -> None:
        """The router lookahead's guess at `layer`'s experts, to read ahead of its compute."""
        ...

    def stats(self) -> ExpertStats:
        """A snapshot of the caches' counters (take one before and one after a window)."""
        ...

    def close(self) -> None:
        """Finish reads in flight and let go of connections; compute is not called after."""
        ...


@dataclass(eq=False)
class Lookahead:
    """Predicts the next MoE layer's experts: its router applied to this layer's expert input.

    Not an nn.Module field (a plain object), so the router is not a second parameter path."""

    layer: int
    router: nn.Module  # the next layer's gate: logits [N, E], or a gate returning (indices, scores)

    def predict(self, x: mx.array, k: int) -> list[int]:
        """x [N, D] -> the distinct experts of the top-k of each row."""
        out = self.router(x)
        if isinstance(out, tuple):  # e.g. deepseek's MoEGate: (indices [N, k], scores)
            ids = out[0]
        else:
            ids = mx.argpartition(-out.astype(mx.float32), kth=k - 1, axis=-1)[..., :k]  # [N, k]
        return np.unique(np.array(ids)).tolist()


class ExpertDispatch(nn.Module):
    def __init__(self, layer: int, backend: ExpertBackend) -> None:
        super().__init__()
        self.layer = layer
        self.backend = backend
        self.lookahead: Lookahead | None = None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        lead, k, d = indices.shape[:-1], indices.shape[-1], x.shape[-1]
        flat = x.reshape(-1, d)  # [N, D]
        if self.lookahead is not None:
            self.backend.hint(self.lookahead.layer, self.lookahead.predict(flat, k))
        y = self.backend.compute(self.layer, flat, indices.reshape(-1, k))  # [N, k, D]
        return y.reshape(*lead, k, d)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parts = path.split(".")
    parent = root
    for part in parts[:-1]:
        parent = parent[int(part)] if part.isdigit() else parent[part]
    parent[parts[-1]] = module


def _get_submodule(root: nn.Module, path: str) -> nn.Module:
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def _router_of(block: nn.Module) -> nn.Module | None:
    """The router of an MoE block (mlx-lm names it `gate` or `router`), if it has one."""
    for name in ("gate", "router"):
        child = block.get(name) if isinstance(block, dict) else None
        if isinstance(child, nn.Module):
            return child
    return None


def install_dispatch(model: nn.Module, backend: ExpertBackend, *, lookahead: bool = False) -> dict[int, nn.Module]:
    """Replace every routed-expert module with an ExpertDispatch; return layer -> the module replaced.

    lookahead: each dispatch predicts the next MoE layer's experts with that layer's router and
    hints them to the backend (in-process: read ahead; nodes: the hint rides on the requests). Off by
    default: measured a net loss (0.72-0.79x decode tok/s) on the CPU-bound reference VM, where it
    covers ~57% of misses but reads 0.6-1.2 wasted experts per useful one (docs/benchmarks.md).
    Turn it on with set_lookahead(model, enabled=True) where flash, not compute, is the limit."""
    replaced = {}
    paths = {}
    for path, module in find_expert_modules(model).items():
        layer = layer_index(path)
        _set_submodule(model, path, ExpertDispatch(layer, backend))
        replaced[layer] = module
        paths[layer] = path
    set_lookahead(model, enabled=lookahead, _paths=paths)
    return replaced


def set_lookahead(model: nn.Module, *, enabled: bool, _paths: dict[int, str] | None = None) -> int:
    """Turn router lookahead on or off for every dispatch in `model`; return how many predict."""
    if _paths is None:
        _paths = {m.layer: p for p, m in model.named_modules() if isinstance(m, ExpertDispatch)}
    layers = sorted(_paths)
    count = 0
    for here, following in zip(layers, layers[1:] + [None], strict=True):
        dispatch = _get_submodule(model, _paths[here])
        dispatch.lookahead = None
        if not enabled or following is None:
            continue
        router = _router_of(_get_submodule(model, _paths[following].rsplit(".", 1)[0]))
        if router is not None:
            dispatch.lookahead = Lookahead(following, router)
            count += 1
    return count
