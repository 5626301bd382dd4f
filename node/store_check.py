"""What `flashmesh pack` checks of a staged store before renaming it into place: that it would run.

The model is built again from the store's own config.json and dense part, exactly as `run` and
the nodes build it, and the manifest must agree with it: its banks are the routed experts a trace
of that model finds (so the dispatch, installed by manifest path, swaps every one and nothing
else), each layer appears once, the dense part fills every other parameter and holds nothing the
model lacks, and each record's tensor table is the bank's parameters for one expert.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from flashmesh.node.expert_banks import ExpertBank, find_expert_banks, submodule
from flashmesh.node.experts import bank_template, load_lazy
from flashmesh.node.store_format import LayerSpec, Manifest, dtype_name
from flashmesh.protos.errors import UserError
from mlx.utils import tree_flatten


def dense_keys(store_path: Path, manifest: Manifest) -> set[str]:
    """Names of the tensors in the store's dense safetensors files."""
    keys: set[str] = set()
    for name in manifest.dense_files:
        path = Path(store_path) / name
        if not path.is_file():
            raise UserError(f"{path} is missing; the store's dense weights are incomplete, re-run `flashmesh pack`")
        try:
            keys.update(mx.load(str(path)).keys())
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{path} cannot be read ({e}); re-run `flashmesh pack`") from None
    return keys


def dense_mismatch(wanted: set[str], dense: set[str]) -> tuple[list[str], list[str]]:
    """(parameters the dense part lacks, dense tensors the model has no place for)."""
    return sorted(wanted - dense), sorted(dense - wanted)


def one_bank_per_layer(banks: list[ExpertBank] | list[LayerSpec]) -> None:
    paths = {b.layer: [] for b in banks}
    for b in banks:
        paths[b.layer].append(b.path if isinstance(b, ExpertBank) else b.module)
    twice = [(layer, p) for layer, p in paths.items() if len(p) > 1]
    if twice:
        layer, p = twice[0]
        raise UserError(f"layer {layer} has routed experts in {' and '.join(p)}; flashmesh streams one bank per layer")


def per_expert_table(bank, *, kind: str, num_experts: int, path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of one expert's tensors in a bank (a switch module, or a list of
    same-shaped expert modules); a switch module's tensors must all have a leading experts axis."""
    if kind == "list":
        return {k: (dtype_name(a.dtype), tuple(a.shape)) for k, a in tree_flatten(bank[0].parameters())}
    params = dict(tree_flatten(bank.parameters()))
    stray = [k for k, a in params.items() if a.ndim == 0 or a.shape[0] != num_experts]
    if stray:
        raise UserError(
            f"the expert module {path} holds {path}.{stray[0]}, which is not per expert "
            f"(shape {tuple(params[stray[0]].shape)}, {num_experts} experts); flashmesh cannot stream it"
        )
    return {k: (dtype_name(a.dtype), tuple(a.shape[1:])) for k, a in params.items()}


def verify_store(path: Path) -> None:
    """Raise UserError, naming the module, unless the store at `path` would run."""
    manifest = Manifest.load(path)
    one_bank_per_layer(manifest.layers)
    model, _ = load_lazy(Path(path), strict=False)
    found = {b.path: b for b in find_expert_banks(model)}
    for spec in manifest.layers:
        bank = found.pop(spec.module, None)
        if bank is None:
            raise UserError(f"the manifest lists {spec.module}, which the model does not route tokens to")
        if bank != ExpertBank(spec.module, spec.kind, spec.layer, spec.top_k, spec.num_experts, spec.input_dim):
            raise UserError(f"the manifest's entry for {spec.module} does not match the model's {bank}")
    if found:
        raise UserError(f"the model routes to {next(iter(found))}, which the manifest lacks: it would not be streamed")
    prefixes = tuple(f"{s.module}." for s in manifest.layers)
    wanted = {k for k, _ in tree_flatten(model.parameters()) if not k.startswith(prefixes)}
    missing, extra = dense_mismatch(wanted, dense_keys(path, manifest))
    if missing:
        raise UserError(f"the dense part lacks {missing[0]} (and {len(missing) - 1} more): it would stay unloaded")
    if extra:
        raise UserError(f"the dense part holds {extra[0]} (and {len(extra) - 1} more), which the model lacks")
    for spec in manifest.layers:
        table = {t.name: (t.dtype, tuple(t.shape)) for t in spec.tensors}
        bank = submodule(model, spec.module)
        if table != per_expert_table(bank, kind=spec.kind, num_experts=spec.num_experts, path=spec.module):
            raise UserError(f"the records of {spec.module} do not hold its parameters")
        computes = {k for k, _ in tree_flatten(bank_template(model, spec).parameters())}
        if computes != set(table):
            raise UserError(f"the module computing {spec.module} takes other tensors than its records hold")
