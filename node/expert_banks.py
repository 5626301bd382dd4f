"""Finding a built mlx-lm model's routed experts by watching a router pick among them.

A module is an expert bank when, in a forward pass on a few tokens, a router selects among its
entries per token, whatever its class or name:

- "switch": a module whose children are mlx-lm switch linears (SwitchGLU, SwitchMLP, a fused
  gate/up variant, ...), called as (x [..., D], indices [..., k]) -> [..., k, D], k <= E.
  deepseek_v41's attention holds a SwitchLinear too, but is called with (x, mask, cache): dense.
- "list": a Python list of E same-shaped modules (dbrx's expert MLPs) that, during one call of
  the module owning the list, together receive k rows per input row with k < E. The decoder-layer
  list gets every row in every layer (k == E): dense.

Top-k is the last dimension of the indices (or the rows per input row) the bank received, so it
comes from the model's own routing code, not from config key names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from flashmesh.protos.errors import UserError
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

SWITCH_LINEARS = (SwitchLinear, QuantizedSwitchLinear)
TRACE_TOKENS = 7  # rows in the traced forward pass; prime, so no shape equals it by accident


@dataclass(frozen=True)
class ExpertBank:
    path: str  # module path of the switch module, or of the list of expert modules
    kind: str  # "switch" or "list"
    layer: int  # decoder layer: the first integer in the path
    top_k: int
    num_experts: int
    input_dim: int  # D of the x [..., D] it was called with


def layer_index(path: str) -> int:
    """The decoder layer a module path belongs to: the first integer component."""
    m = re.search(r"\.(\d+)\.", f".{path}.")
    if m is None:
        raise UserError(f"cannot tell which layer the expert module {path} belongs to")
    return int(m.group(1))


def _rows(a: mx.array) -> int:
    n = 1
    for d in a.shape[:-1]:
        n *= d
    return n


def _arrays(args: tuple, kwargs: dict) -> list[mx.array]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)]


@dataclass
class _Observed:
    """What the trace saw of one candidate: (top-k, input dim) per call, None for a call not routed."""

    calls: list[tuple[int, int] | None] = field(default_factory=list)

    def routing(self, num_experts: int) -> tuple[int, int] | None:
        """(k, D) when every call picked the same k <= E of its experts for inputs of width D."""
        seen = set(self.calls)
        if len(seen) != 1 or None in seen:
            return None
        (kd,) = seen
        return kd if 0 < kd[0] <= num_experts else None


def _switch_call(args: tuple, kwargs: dict, out) -> tuple[int, int] | None:
    """(k, D) when the call was (x [..., D], indices [..., k]) -> [..., k, D'], else None."""
    arrays = _arrays(args, kwargs)
    if len(arrays) < 2 or not isinstance(out, mx.array):
        return None
    x, idx = arrays[0], arrays[1]
    if not mx.issubdtype(x.dtype, mx.floating) or not mx.issubdtype(idx.dtype, mx.integer) or idx.ndim < 1:
        return None
    if tuple(idx.shape[:-1]) != tuple(x.shape[:-1]) or tuple(out.shape[:-1]) != tuple(idx.shape):
        return None
    return int(idx.shape[-1]), int(x.shape[-1])


def _switch_candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {
        path: m
        for path, m in model.named_modules()
        if path and any(isinstance(c, SWITCH_LINEARS) for c in m.children().values())
    }


def _shape_tree(m: nn.Module) -> list:
    return [(k, tuple(v.shape), v.dtype) for k, v in tree_flatten(m.parameters())]


def _list_candidates(model: nn.Module) -> dict[str, tuple[nn.Module, list]]:
    """path of the list -> (owner module, entries): lists of >= 2 same-shaped, parameterised modules."""
    out = {}
    for path, m in model.named_modules():
        for name, value in m.children().items():
            if not isinstance(value, list) or len(value) < 2:
                continue
            if not all(isinstance(e, nn.Module) for e in value):
                continue
            shapes = _shape_tree(value[0])
            if shapes and all(_shape_tree(e) == shapes for e in value[1:]):
                out[f"{path}.{name}" if path else name] = (m, value)
    return out


@contextmanager
def _hooked(modules: list[nn.Module], hook) -> Iterator[None]:
    """Run hook(module, call, args, kwargs) around each module's calls (its class swapped for a
    subclass while the block runs, so every reference to the module sees it)."""
    originals = [m.__class__ for m in modules]
    subclasses: dict[type, type] = {}
    for m, cls in zip(modules, originals, strict=True):
        if cls not in subclasses:

            def __call__(self, *args, _cls=cls, **kwargs):
                return hook(self, _cls.__call__, args, kwargs)

            subclasses[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
        m.__class__ = subclasses[cls]
    try:
        yield
    finally:
        for m, cls in zip(modules, originals, strict=True):
            m.__class__ = cls


def _trace_forward(model: nn.Module) -> None:
    tokens = mx.arange(1, TRACE_TOKENS + 1)[None]  # [1, T]: ids every vocabulary has
    try:
        out = model(tokens, cache=make_prompt_cache(model))
    except Exception as e:  # architecture code may raise anything; all mean "cannot trace"
        raise UserError(
            f"the model's forward pass failed while looking for its experts ({type(e).__name__}: {e})"
        ) from None
    del out  # the shapes were all the trace needed; nothing is evaluated here


def find_expert_banks(model: nn.Module) -> list[ExpertBank]:
    """The model's routed-expert banks, by layer; found by tracing one forward pass (lazily: only
    what the model's own code evaluates, e.g. dbrx's per-token expert loop, is computed)."""
    switches = _switch_candidates(model)
    lists = _list_candidates(model)
    seen = {id(m): _Observed() for m in switches.values()}
    owned: dict[int, list[str]] = {}  # owner -> its candidate lists
    for path, (owner, _) in lists.items():
        owned.setdefault(id(owner), []).append(path)
    entry_of = {id(e): path for path, (_, entries) in lists.items() for e in entries}
    open_calls: dict[str, list[list[int]]] = {path: [] for path in lists}  # [rows in, rows to entries, D]
    finished: dict[str, list[tuple[int, ...]]] = {path: [] for path in lists}

    def hook(module, call, args, kwargs):
        key = id(module)
        if key in owned:
            arrays = _arrays(args, kwargs)
            floating = bool(arrays) and mx.issubdtype(arrays[0].dtype, mx.floating)
            frames = {
                path: [_rows(arrays[0]), 0, arrays[0].shape[-1]] if floating else [0, 0, 0] for path in owned[key]
            }
            for path, frame in frames.items():
                open_calls[path].append(frame)
            try:
                return call(module, *args, **kwargs)
            finally:
                for path, frame in frames.items():
                    open_calls[path].pop()
                    finished[path].append(tuple(frame))
        if key in entry_of:
            frames = open_calls[entry_of[key]]
            arrays = _arrays(args, kwargs)
            if frames:
                frames[-1][1] += _rows(arrays[0]) if arrays else -(10**9)  # no input array: not routed
            return call(module, *args, **kwargs)
        out = call(module, *args, **kwargs)
        seen[key].calls.append(_switch_call(args, kwargs, out))
        return out

    owners = list({id(o): o for o, _ in lists.values()}.values())
    entries = [e for _, es in lists.values() for e in es]
    with _hooked([*switches.values(), *owners, *entries], hook):
        _trace_forward(model)

    banks = []
    for path, m in switches.items():
        num_experts = {c.num_experts for c in m.children().values() if isinstance(c, SWITCH_LINEARS)}
        routing = seen[id(m)].routing(min(num_experts))
        if routing is not None and len(num_experts) == 1:
            banks.append(ExpertBank(path, "switch", layer_index(path), routing[0], num_experts.pop(), routing[1]))
    for path, (_, es) in lists.items():
        seen = {(to // rows, d) if rows > 0 and to > 0 and to % rows == 0 else None for rows, to, d in finished[path]}
        if len(seen) == 1 and None not in seen and 0 < (kd := seen.pop())[0] < len(es):
            banks.append(ExpertBank(path, "list", layer_index(path), kd[0], len(es), kd[1]))
    return sorted(banks, key=lambda b: (b.layer, b.path))


def submodule(root: nn.Module, path: str):
    """The module (or list of modules) at a dotted parameter path."""
    node = root
    try:
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else node[part]
    except (KeyError, IndexError, TypeError):
        raise UserError(
            f"the model has no module {path}: the store is from another model; re-run `flashmesh pack`"
        ) from None
    return node


def set_submodule(root: nn.Module, path: str, module) -> None:
    parent, _, last = path.rpartition(".")
    owner = submodule(root, parent) if parent else root
    owner[int(last) if last.isdigit() else last] = module
