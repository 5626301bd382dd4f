"""The expert dispatch that replaces mlx-lm's routed-expert modules in a built model.

`ExpertDispatch` has SwitchGLU's call signature, (x [..., D], indices [..., k]) -> [..., k, D],
and hands the call as it is to an `ExpertBackend`: in-process (node.compute.LocalExperts) or remote
nodes. Nothing is reshaped here: in a deep model every extra op per layer is paid 48-61 times a token.
Routing, score weighting and shared experts stay in mlx-lm's own MoE block, untouched. Which
modules are swapped is the store manifest's list (found by `pack`, node/expert_banks.py); a list
of per-expert modules (dbrx) gets coordinator/list_dispatch.py instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmesh.coordinator.list_dispatch import expert_lists, install_list_dispatch
from flashmesh.node.cache_stats import ExpertStats
from flashmesh.node.expert_banks import set_submodule, submodule
from flashmesh.node.experts import bank_template
from flashmesh.node.store_format import LayerSpec


class ExpertBackend(Protocol):
    """Where the routed experts of a built model are computed: node.compute.LocalExperts in this
    process, coordinator.remote.RemoteExperts on nodes. Chosen in one place (coordinator.engine)."""

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] (the routed-expert module's own call) -> per-pair expert
        outputs [..., k, D]."""
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
        """x [N, D] -> the distinct experts of the top-k of each row, most likely first (by their
        best rank in any row), so that reads the layer turns out not to need are the last queued."""
        out = self.router(x)
        if isinstance(out, tuple):  # e.g. deepseek's MoEGate: (indices [N, k], scores [N, k])
            ids, scores = out[0], out[1]
        else:
            logits = out.astype(mx.float32)  # [N, E]
            ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]  # [N, k], unordered
            scores = mx.take_along_axis(logits, ids, axis=-1)
        ranked = mx.take_along_axis(ids, mx.argsort(-scores, axis=-1), axis=-1)  # [N, k], best first
        return list(dict.fromkeys(np.array(ranked).T.reshape(-1).tolist()))


class ExpertDispatch(nn.Module):
    def __init__(self, layer: int, backend: ExpertBackend | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.backend = backend  # bound by bind_backend when the backend is made
        self.lookahead: Lookahead | None = None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        if self.lookahead is not None:
            flat = x.reshape(-1, x.shape[-1])  # [N, D]
            self.backend.hint(self.lookahead.layer, self.lookahead.predict(flat, indices.shape[-1]))
        return self.backend.compute(self.layer, x, indices)  # [..., k, D]


def _router_of(block: nn.Module) -> nn.Module | None:
    """The router of an MoE block (mlx-lm names it `gate` or `router`), if it has one."""
    for name in ("gate", "router"):
        child = block.get(name) if isinstance(block, dict) else None
        if isinstance(child, nn.Module):
            return child
    return None


def install_dispatch(model: nn.Module, layers: list[LayerSpec]) -> dict[int, nn.Module]:
    """Swap every routed-expert bank the store's manifest names (`layers`) for a dispatch; return
    layer -> the module computing that layer's experts (node.experts.bank_template), taken out of
    the model. Bind a backend with bind_backend before running the model."""
    replaced = {}
    for spec in layers:
        replaced[spec.layer] = bank_template(model, spec)
        if spec.kind == "list":
            install_list_dispatch(model, spec.module, spec.layer)
        else:
            set_submodule(model, spec.module, ExpertDispatch(spec.layer))
    return replaced


def bind_backend(model: nn.Module, backend: ExpertBackend, *, lookahead: bool = False) -> int:
    """Point every dispatch of `model` at `backend`; return how many there are.

    lookahead: each dispatch predicts the next MoE layer's experts with that layer's router and
    hints them to the backend (in-process: read ahead; nodes: the hint rides on the requests).
    `open_model` turns it on where it pays (coordinator.options.lookahead_pays: big expert reads,
    a budget that does not hold them all); set_lookahead(model, enabled=...) switches it after."""
    dispatches = [m for m in model.modules() if isinstance(m, ExpertDispatch)]
    lists = expert_lists(model)
    for d in (*dispatches, *lists):
        d.backend = backend
    set_lookahead(model, enabled=lookahead)
    return len(dispatches) + len(lists)


def set_lookahead(model: nn.Module, *, enabled: bool) -> int:
    """Turn router lookahead on or off for every switch dispatch in `model`; return how many predict."""
    _paths = {m.layer: p for p, m in model.named_modules() if isinstance(m, ExpertDispatch)}
    layers = sorted(_paths)
    if not layers:
        return 0
    count = 0
    for here, following in zip(layers, layers[1:] + [None], strict=True):
        dispatch = submodule(model, _paths[here])
        dispatch.lookahead = None
        if not enabled or following is None:
            continue
        router = _router_of(submodule(model, _paths[following].rsplit(".", 1)[0]))
        if router is not None:
            dispatch.lookahead = Lookahead(following, router)
            count += 1
    return count
