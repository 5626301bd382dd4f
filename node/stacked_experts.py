"""A list of per-expert modules (dbrx's expert MLPs) computed as one batched call, like SwitchGLU.

The model's own expert module runs unchanged, with each of its linears swapped for mlx-lm's
SwitchLinear / QuantizedSwitchLinear over the stacked weights of every expert: its activation and
wiring stay the model's, and all (row, expert) pairs of a wave go through one gather_mm per linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from flashmesh.protos.errors import UserError
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear


@dataclass(eq=False)
class _Routing:
    """The expert (slot) ids of the call in progress, shared by a StackedExperts and its linears."""

    indices: mx.array | None = None


class _RoutedSwitchLinear(SwitchLinear):
    """mlx-lm's SwitchLinear called as the nn.Linear it replaces: x [..., 1, in] -> [..., k, 1, out]."""

    def __init__(self, linear: nn.Linear, routing: _Routing) -> None:
        nn.Module.__init__(self)
        for name, a in linear.parameters().items():  # placeholders: the cache's slabs replace them per call
            self[name] = a
        self.routing = routing

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x, self.routing.indices)


class _RoutedQuantizedSwitchLinear(QuantizedSwitchLinear):
    def __init__(self, linear: nn.QuantizedLinear, routing: _Routing) -> None:
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = linear.group_size, linear.bits, linear.mode
        self.global_scale = None
        for name, a in linear.parameters().items():
            self[name] = a
        self.routing = routing

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x, self.routing.indices)


def _route_linears(module: nn.Module, routing: _Routing, path: str) -> None:
    """Swap every linear below `module` for its routed switch form, in place."""
    for name, child in module.children().items():
        here = f"{path}.{name}"
        if isinstance(child, nn.QuantizedLinear):
            module[name] = _RoutedQuantizedSwitchLinear(child, routing)
        elif isinstance(child, nn.Linear):
            module[name] = _RoutedSwitchLinear(child, routing)
        elif isinstance(child, nn.Module):
            _route_linears(child, routing, here)
        else:
            raise UserError(f"the expert module {path} holds {here}, a {type(child).__name__}: cannot batch it")
    stray = [k for k, v in module.items() if isinstance(v, mx.array)]
    if stray:
        raise UserError(f"the expert module {path} holds {path}.{stray[0]} outside a linear: cannot batch it")


class StackedExperts(nn.Module):
    """One expert module of a list, computing every expert: (x [N, D], indices [N, k]) -> [N, k, D].

    Its parameters have the expert module's names with a leading experts (slots) axis, i.e. the
    store's record tensor table stacked, so the node computes with the cache's slabs as they are."""

    def __init__(self, expert: nn.Module, *, path: str) -> None:
        super().__init__()
        routing = _Routing()
        _route_linears(expert, routing, path)
        for name, child in expert.children().items():  # the same objects: their names are the record's
            self[name] = child
        self._routing = routing
        self._expert = expert  # a plain attribute (set below), called for its own wiring

    def __setattr__(self, key, val):
        if key in ("_routing", "_expert"):
            object.__setattr__(self, key, val)
        else:
            super().__setattr__(key, val)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        self._routing.indices = indices
        try:
            y = self._expert(mx.expand_dims(x, (-2, -3)))  # [N, k, 1, D]
        finally:
            self._routing.indices = None
        return y.squeeze(-2)
