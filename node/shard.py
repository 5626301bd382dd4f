"""`flashmesh shard`: write the subset of a store one machine serves, or the dense part a
coordinator needs.

An expert shard is an ordinary store (same format) whose per-layer `experts` list and checksums
name only the records it holds, and whose manifest `shard` field says
{"index", "count", "replicas"}. It keeps the full model's fingerprint, config.json (the node builds
mlx-lm's expert modules from it) and manifest, but no dense weights and no tokenizer: a node never
runs attention, so copying them would only cost flash. Expert e of every layer goes to shard
(e + r) mod count for r < replicas, so replicas land on different machines.

The dense part (`--dense`) is the other half: manifest, config, tokenizer and dense safetensors,
no expert records; `flashmesh run --cluster` needs only that on the coordinator.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flashmesh.node.store_format import Manifest, staged_directory, write_json_atomic
from flashmesh.node.store_reader import ExpertStore
from flashmesh.node.store_writer import TOKENIZER_FILES
from flashmesh.protos.errors import UserError


def shard_experts(num_experts: int, *, count: int, index: int, replicas: int = 1) -> list[int]:
    """The experts of a layer that shard `index` of `count` holds."""
    return [e for e in range(num_experts) if any((e + r) % count == index for r in range(replicas))]


def _dense_bytes(store: Path, source: Manifest) -> int:
    names = [*source.dense_files, "config.json", "manifest.json", *TOKENIZER_FILES]
    return sum((Path(store) / n).stat().st_size for n in names if (Path(store) / n).is_file())


@contextmanager
def _staged_store(out: Path, force: bool, needs: int) -> Iterator[Path]:
    if out.exists() and not force:
        raise UserError(f"{out} already exists; remove it or pass --force")
    with staged_directory(out, needs=needs) as tmp:
        (tmp / "experts").mkdir()
        yield tmp


def write_shard(store: Path, out: Path, *, count: int, index: int, replicas: int = 1, force: bool = False) -> Manifest:
    """Copy (checksum-verified) the records shard `index` of `count` holds into a new store."""
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--index must be in 0..{count - 1} for --count {count}")
    if not 1 <= replicas <= count:
        raise UserError(f"--replicas must be in 1..{count} for --count {count}")
    source = Manifest.load(store)
    if source.shard is not None:
        raise UserError(f"{store} is itself a shard ({source.shard}); shard the full store")
    out = Path(out)
    held_records = sum(
        spec.record_size * sum(spec.holds(e) for e in shard_experts(spec.num_experts, count=count, index=index,
                                                                    replicas=replicas))
        for spec in source.layers
    )  # fmt: skip
    with _staged_store(out, force, held_records + _dense_bytes(store, source)) as tmp:
        layers = []
        with ExpertStore(store, page_cache=True, verify=True) as reader:
            for spec in source.layers:
                mine = [e for e in shard_experts(spec.num_experts, count=count, index=index, replicas=replicas)]
                held = [e for e in mine if spec.holds(e)]
                with open(tmp / spec.file, "wb") as f:
                    for e in held:
                        f.write(reader.read_raw(spec.layer, e))  # whole aligned records, verified
                    f.flush()
                    os.fsync(f.fileno())
                layer = spec.to_json()
                layer.update(experts=held, checksums=[spec.record_checksum(e) for e in held])
                layers.append(layer)
        manifest = source.to_json()
        manifest.update(layers=layers, dense_files=[], shard={"index": index, "count": count, "replicas": replicas})
        shutil.copy2(Path(store) / "config.json", tmp / "config.json")
        write_json_atomic(tmp / "manifest.json", manifest)
    return Manifest.load(out)


def write_dense(store: Path, out: Path, *, force: bool = False) -> Manifest:
    """The coordinator's part of a store: dense weights, config, tokenizer; no expert records."""
    source = Manifest.load(store)
    out = Path(out)
    with _staged_store(out, force, _dense_bytes(store, source)) as tmp:
        for name in [*source.dense_files, "config.json", *TOKENIZER_FILES]:
            if (Path(store) / name).is_file():
                shutil.copy2(Path(store) / name, tmp / name)
            elif name in source.dense_files:
                raise UserError(f"{store / name} is missing; the store is incomplete, re-run `flashmesh pack`")
        manifest = source.to_json()
        for layer in manifest["layers"]:
            layer.update(experts=[], checksums=[])
            (tmp / layer["file"]).touch()
        manifest["shard"] = {"dense_only": True}
        write_json_atomic(tmp / "manifest.json", manifest)
    return Manifest.load(out)
