"""`flashmesh pack`: turn an mlx-lm / Hugging Face model directory into a flash store.

The source is loaded lazily through mlx-lm's own load_model (its sanitize and quantization
handling included), so a tensor is read from the source only when it is written out: at most one
routed-expert tensor of one layer (and its sanitize inputs) is in RAM at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from flashmesh.node.expert_banks import ExpertBank, find_expert_banks, submodule
from flashmesh.node.experts import load_lazy, quantization_of
from flashmesh.node.store_check import one_bank_per_layer, per_expert_table, verify_store
from flashmesh.node.store_format import (
    RECORD_ALIGN,
    LayerSpec,
    Manifest,
    checksum,
    file_checksum,
    fingerprint,
    layout_record,
    raw_bytes,
    staged_directory,
    write_json_atomic,
)
from flashmesh.protos.errors import UserError
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger(__name__)

DENSE_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)


def resolve_source(src: str) -> Path:
    """A local directory, or a Hugging Face hub id downloaded with huggingface_hub."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{src} is a file; point `flashmesh pack` at a model directory")
        return path
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise UserError(f"{src} does not exist; give a model directory or a hub id like org/name")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    return from_hub(src, lambda: snapshot_download(src, allow_patterns=patterns), what="", fix="a local directory")


def from_hub(model_id: str, fetch, *, what: str, fix: str) -> Path:
    """fetch() (a huggingface_hub download of `what` of `model_id`) as a Path; any failure is one line."""
    try:
        return Path(fetch())
    except Exception as e:  # the hub raises many types; all mean "could not fetch"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{model_id} is not a local {'path' if what else 'directory'} and {what or 'it'} could not be downloaded "
            f"from the Hugging Face hub ({type(e).__name__}: {reason[:200]}); check the id and the network, or pass "
            f"{fix}"
        ) from None


def pack(src: str, out: Path, *, force: bool = False, show_progress: bool = True) -> Manifest:
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; remove it or pass --force")
    source = resolve_source(src)
    params, config, banks = _lazy_source(source)
    with staged_directory(out, needs=_store_bytes(params, banks)) as tmp:
        (tmp / "experts").mkdir()
        manifest = _write_store(params, config, banks, source, tmp, show_progress)
        try:
            verify_store(tmp)  # a store that would not run is never renamed into place
        except UserError as e:
            raise UserError(f"cannot pack {source}: the store would not run: {e}; nothing was written") from None
    log.info("packed %s into %s (fingerprint %s)", source, out, manifest.fingerprint)
    return manifest


def _store_bytes(params: dict[str, mx.array], banks: list) -> int:
    """About the bytes of the store: every tensor, plus up to one alignment gap per expert record."""
    return sum(a.nbytes for a in params.values()) + sum(b.num_experts for b, _ in banks) * RECORD_ALIGN


_LINEARS = (SwitchLinear, QuantizedSwitchLinear, nn.Linear, nn.QuantizedLinear)


def _lazy_source(source: Path) -> tuple[dict[str, mx.array], dict, list[tuple[ExpertBank, dict]]]:
    """The source's parameters as lazy arrays (name -> array), its config, and its expert banks with
    each one's per-expert tensor table (name -> (dtype, shape)), by layer.

    Only the flat dict survives this function: no module tree keeps a reference to a tensor, so
    each one is freed as soon as it has been written.
    """
    model, config = load_lazy(source, strict=True)
    banks = find_expert_banks(model)
    if not banks:
        raise UserError(
            f"{source} is a dense model ({config.get('model_type')}): it has no routed experts to "
            "stream; flashmesh runs Mixture-of-Experts models"
        )
    one_bank_per_layer(banks)
    tables = [
        (b, per_expert_table(submodule(model, b.path), kind=b.kind, num_experts=b.num_experts, path=b.path))
        for b in banks
    ]
    # Quantization of each expert linear goes into config["quantization"] by path, where
    # mlx-lm's own loader looks first, so the node's template modules match the records.
    quantization = config.get("quantization")
    if quantization is not None:
        prefixes = tuple(f"{b.path}." for b in banks)
        expert_quant = {
            path: quantization_of(m)
            for path, m in model.named_modules()
            if path.startswith(prefixes) and isinstance(m, _LINEARS)
        }
        config = {**config, "quantization": {**quantization, **expert_quant}}
        config.pop("quantization_config", None)
    return dict(tree_flatten(model.parameters())), config, tables


def _write_store(
    params: dict[str, mx.array],
    config: dict,
    by_layer: list[tuple[ExpertBank, dict]],
    source: Path,
    tmp: Path,
    show_progress: bool,
) -> Manifest:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    )
    layers: list[LayerSpec] = []
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("packing expert layers", total=len(by_layer))
        for bank, table in by_layer:
            layers.append(_write_layer(bank, table, params, tmp))
            progress.advance(task)
        dense_task = progress.add_task("writing dense weights", total=len(params))
        dense_files, dense_sums = _write_dense(params, tmp, lambda n: progress.advance(dense_task, n))

    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    write_json_atomic(tmp / "config.json", config)
    manifest = Manifest(
        config=config,
        fingerprint=fingerprint(config, layers, dense_sums),
        layers=layers,
        quantization=config.get("quantization"),
        dense_files=dense_files,
    )
    manifest.save(tmp)
    return manifest


def _evaluated(name: str, a: mx.array) -> mx.array:
    try:
        mx.eval(a)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"cannot read tensor {name} from the source ({e}); is a safetensors file truncated?") from None
    return a


def _source_key(bank: ExpertBank, name: str, expert: int) -> str:
    return f"{bank.path}.{expert}.{name}" if bank.kind == "list" else f"{bank.path}.{name}"


def _expert_bytes(bank: ExpertBank, name: str, params: dict[str, mx.array]):
    """(expert, bytes of its tensor `name`) for every expert; one source tensor in RAM at a time:
    a switch bank's stacked [E, ...] tensor is sliced, a list bank's expert tensors are separate."""
    if bank.kind == "list":
        for e in range(bank.num_experts):
            key = _source_key(bank, name, e)
            yield e, raw_bytes(_evaluated(key, params.pop(key)))
        return
    key = _source_key(bank, name, 0)
    data = raw_bytes(_evaluated(key, params.pop(key)))
    size = len(data) // bank.num_experts
    for e in range(bank.num_experts):
        yield e, data[e * size : (e + 1) * size]


def _write_layer(bank: ExpertBank, table: dict, params: dict[str, mx.array], tmp: Path) -> LayerSpec:
    n = bank.num_experts
    stacked = 1 if bank.kind == "list" else n  # experts per source tensor
    per_expert = {
        name: (dtype, shape, params[_source_key(bank, name, 0)].nbytes // stacked)
        for name, (dtype, shape) in table.items()
    }
    tensors, record_size = layout_record(per_expert)
    spec = LayerSpec(
        layer=bank.layer,
        module=bank.path,
        num_experts=n,
        record_size=record_size,
        tensors=tensors,
        experts=list(range(n)),
        checksums=[],
        top_k=bank.top_k,
        kind=bank.kind,
        input_dim=bank.input_dim,
    )
    fd = os.open(tmp / spec.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, n * record_size)
        for t in tensors:
            for e, data in _expert_bytes(bank, t.name, params):
                os.pwrite(fd, data, e * record_size + t.offset)
        spec.checksums = [checksum(os.pread(fd, record_size, e * record_size)) for e in range(n)]
        os.fsync(fd)
    finally:
        os.close(fd)
    return spec


def _write_dense(params: dict[str, mx.array], tmp: Path, advance) -> tuple[list[str], list[str]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(params):
        if size and size + params[name].nbytes > DENSE_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = params[name]
        size += params[name].nbytes
    files, sums = [], []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for k, v in shard.items():
            _evaluated(k, v)
        mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
        advance(len(shard))
        sums.append(file_checksum(tmp / name))
        files.append(name)
        for k in shard:
            params.pop(k)
    return files, sums
