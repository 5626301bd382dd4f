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
from flashmesh.node.experts import find_expert_modules, layer_index, load_lazy, quantization_of
from flashmesh.node.store_format import (
    RECORD_ALIGN,
    LayerSpec,
    Manifest,
    StoreError,
    checksum,
    dtype_name,
    file_checksum,
    fingerprint,
    layout_record,
    raw_bytes,
    staged_directory,
    write_json_atomic,
)
from mlx.utils import tree_flatten
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
            raise StoreError(f"{src} is a file; point `flashmesh pack` at a model directory")
        return path
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise StoreError(f"{src} does not exist; give a model directory or a hub id like org/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
            )
        )
    except Exception as e:  # the hub raises many types; all mean "could not fetch"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(
            f"{src} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {reason[:200]}); check the id and the network, or pass a local directory"
        ) from None


def pack(src: str, out: Path, *, force: bool = False, show_progress: bool = True) -> Manifest:
    out = Path(out)
    if out.exists() and not force:
        raise StoreError(f"{out} already exists; remove it or pass --force")
    source = resolve_source(src)
    params, config, expert_paths = _lazy_source(source)
    with staged_directory(out, needs=_store_bytes(params, expert_paths)) as tmp:
        (tmp / "experts").mkdir()
        manifest = _write_store(params, config, expert_paths, source, tmp, show_progress)
    log.info("packed %s into %s (fingerprint %s)", source, out, manifest.fingerprint)
    return manifest


def _store_bytes(params: dict[str, mx.array], expert_paths: list[str]) -> int:
    """About the bytes of the store: every tensor, plus up to one alignment gap per expert record."""
    records = 0
    for path in expert_paths:
        first = next((a for k, a in params.items() if k.startswith(f"{path}.")), None)
        records += first.shape[0] if first is not None and first.ndim else 0  # [E, ...]
    return sum(a.nbytes for a in params.values()) + records * RECORD_ALIGN


def _lazy_source(source: Path) -> tuple[dict[str, mx.array], dict, list[str]]:
    """The source's parameters as lazy arrays (name -> array), its config, and the expert module paths.

    Only the flat dict survives this function: no module tree keeps a reference to a tensor, so
    each one is freed as soon as it has been written.
    """
    model, config = load_lazy(source, strict=True)
    experts = find_expert_modules(model)
    if not experts:
        raise StoreError(
            f"{source} is a dense model ({config.get('model_type')}): it has no routed experts to "
            "stream; flashmesh runs Mixture-of-Experts models"
        )
    # Quantization of each expert linear goes into config["quantization"] by path, where
    # mlx-lm's own loader looks first, so the node's template modules match the records.
    quantization = config.get("quantization")
    if quantization is not None:
        expert_quant = {
            f"{path}.{name}": quantization_of(child)
            for path, module in experts.items()
            for name, child in module.children().items()
            if hasattr(child, "num_experts")
        }
        config = {**config, "quantization": {**quantization, **expert_quant}}
        config.pop("quantization_config", None)
    return dict(tree_flatten(model.parameters())), config, sorted(experts, key=layer_index)


def _write_store(
    params: dict[str, mx.array], config: dict, by_layer: list[str], source: Path, tmp: Path, show_progress: bool
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
        for path in by_layer:
            layers.append(_write_layer(path, params, tmp))
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
        raise StoreError(f"cannot read tensor {name} from the source ({e}); is a safetensors file truncated?") from None
    return a


def _write_layer(path: str, params: dict[str, mx.array], tmp: Path) -> LayerSpec:
    prefix = f"{path}."
    names = sorted(k for k in params if k.startswith(prefix))
    num_experts = params[names[0]].shape[0]
    per_expert = {
        k[len(prefix) :]: (dtype_name(params[k].dtype), params[k].shape[1:], params[k].nbytes // num_experts)
        for k in names
    }
    tensors, record_size = layout_record(per_expert)
    spec = LayerSpec(
        layer=layer_index(path),
        module=path,
        num_experts=num_experts,
        record_size=record_size,
        tensors=tensors,
        experts=list(range(num_experts)),
        checksums=[],
    )
    fd = os.open(tmp / spec.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, num_experts * record_size)
        for t in tensors:
            # One stacked tensor [E, ...] in RAM at a time; each expert's slice goes to its record.
            data = raw_bytes(_evaluated(prefix + t.name, params.pop(prefix + t.name)))
            for e in range(num_experts):
                os.pwrite(fd, data[e * t.nbytes : (e + 1) * t.nbytes], e * record_size + t.offset)
            del data
        spec.checksums = [checksum(os.pread(fd, record_size, e * record_size)) for e in range(num_experts)]
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
