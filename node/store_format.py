"""The flash store's on-disk format: manifest, record layout, dtypes, checksums.

A store is a directory:
  manifest.json            format version, source config, fingerprint, per MoE layer the tensor table
  config.json              the model's config (plus per-path quantization of the expert modules)
  model-*.safetensors      dense weights (everything but routed experts), mlx-lm names
  tokenizer files
  experts/layer_XXX.bin    one record per held expert, each RECORD_ALIGN-aligned
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import xxhash
from flashmesh.protos import codec
from flashmesh.protos.errors import UserError

FORMAT_VERSION = 2  # 2: each layer names its bank's kind and top-k, read from the model by pack
RECORD_ALIGN = 16 * 1024  # one aligned pread per expert; also the iOS page size
TENSOR_ALIGN = 64  # tensors inside a record start on cache-line boundaries
MANIFEST = "manifest.json"


class RecordError(UserError):
    """One expert record cannot be used (checksum mismatch, short read): names its layer and expert."""

    def __init__(self, layer: int, expert: int, message: str) -> None:
        super().__init__(f"layer {layer} expert {expert}: {message}")
        self.layer = layer
        self.expert = expert
        self.records: tuple[tuple[int, int], ...] = ((layer, expert),)  # every record of the read that failed


def dtype_name(dtype: mx.Dtype) -> str:
    """The store's name of an expert tensor's dtype (the wire's, protos.codec.DTYPES)."""
    try:
        return codec.dtype_name(dtype)
    except codec.CodecError:
        raise UserError(f"expert tensors of dtype {dtype} are not supported by the store") from None


def raw_bytes(a: mx.array) -> memoryview:
    """The raw little-endian bytes of an evaluated array, without copying where the buffer allows."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(a))).cast("B")


def from_buffer(buf, spec: TensorSpec, base: int = 0) -> mx.array:
    """Copy one tensor out of a record buffer into a new mx array."""
    np_dtype, mx_dtype = codec.DTYPES[spec.dtype]
    count = int(np.prod(spec.shape)) if spec.shape else 1
    arr = np.frombuffer(buf, dtype=np_dtype, count=count, offset=base + spec.offset)
    out = mx.array(arr.reshape(spec.shape))
    return out.view(mx.bfloat16) if spec.dtype == "bfloat16" else out


def checksum(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def file_checksum(path: Path, *, chunk: int = 16 * 1024 * 1024) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def align_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class TensorSpec:
    name: str  # relative to the expert module, e.g. "gate_proj.weight"
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the record
    nbytes: int


@dataclass
class LayerSpec:
    layer: int  # decoder layer index
    module: str  # path of the routed-expert module in the mlx-lm model
    num_experts: int  # experts in the full model
    record_size: int  # bytes, a multiple of RECORD_ALIGN
    tensors: list[TensorSpec]
    experts: list[int]  # experts held by this store, in file order
    checksums: list[str]  # one per held expert, same order
    file: str = ""
    top_k: int = 0  # experts the layer's router picks per token, seen by pack in the model's own forward pass
    kind: str = "switch"  # "switch": one stacked-expert module; "list": a list of per-expert modules
    input_dim: int = 0  # D of the hidden states x [N, D] the bank takes, seen by pack like top_k

    def __post_init__(self) -> None:
        self.file = self.file or f"experts/layer_{self.layer:03d}.bin"
        self._slot = {e: i for i, e in enumerate(self.experts)}

    @property
    def payload_bytes(self) -> int:
        """Bytes of one expert's tensors (the RAM an expert costs in the cache)."""
        return sum(t.nbytes for t in self.tensors)

    def holds(self, expert: int) -> bool:
        return expert in self._slot

    def record_offset(self, expert: int) -> int:
        try:
            return self._slot[expert] * self.record_size
        except KeyError:
            raise UserError(f"layer {self.layer} expert {expert} is not held by this store") from None

    def record_checksum(self, expert: int) -> str:
        return self.checksums[self._slot[expert]]

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["tensors"] = [asdict(t) for t in self.tensors]
        return d

    @classmethod
    def from_json(cls, d: dict) -> LayerSpec:
        tensors = [TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in d["tensors"]]
        return cls(**{**d, "tensors": tensors})


def layout_record(arrays: dict[str, tuple[str, tuple[int, ...], int]]) -> tuple[list[TensorSpec], int]:
    """Place tensors (name -> (dtype, shape, nbytes)) in a record; return specs and record size."""
    specs, offset = [], 0
    for name in sorted(arrays):
        dtype, shape, nbytes = arrays[name]
        offset = align_up(offset, TENSOR_ALIGN)
        specs.append(TensorSpec(name, dtype, tuple(shape), offset, nbytes))
        offset += nbytes
    return specs, align_up(max(offset, 1), RECORD_ALIGN)


@dataclass
class Manifest:
    config: dict
    fingerprint: str
    layers: list[LayerSpec]
    quantization: dict | None = None
    format_version: int = FORMAT_VERSION
    dense_files: list[str] = field(default_factory=list)
    shard: dict | None = None  # {"index": i, "count": n} for a subset store

    @property
    def top_k(self) -> int:
        """Most experts any MoE layer's router picks per token (recorded by pack from the model)."""
        return max(s.top_k for s in self.layers)

    def layer(self, layer: int) -> LayerSpec:
        for spec in self.layers:
            if spec.layer == layer:
                return spec
        raise UserError(f"layer {layer} is not a MoE layer of this model")

    @property
    def expert_bytes_total(self) -> int:
        """Payload bytes of every routed expert of the full model."""
        return sum(s.num_experts * s.payload_bytes for s in self.layers)

    @property
    def min_budget_bytes(self) -> int:
        """One decode step's top-k experts of the largest layer must fit in the cache at once."""
        return self.top_k * max(s.payload_bytes for s in self.layers)

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "quantization": self.quantization,
            "dense_files": self.dense_files,
            "shard": self.shard,
            "layers": [s.to_json() for s in self.layers],
        }

    def save(self, directory: Path) -> None:
        write_json_atomic(directory / MANIFEST, self.to_json())

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise UserError(f"{directory} is not a flashmesh store (no {MANIFEST}); create one with `flashmesh pack`")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); re-run `flashmesh pack`") from None
        version = d.get("format_version") if isinstance(d, dict) else None
        if version != FORMAT_VERSION:
            raise UserError(
                f"{directory} has store format {version}, this flashmesh reads format "
                f"{FORMAT_VERSION}; re-pack it with `flashmesh pack`"
            )
        from flashmesh.node.manifest_check import check_manifest

        check_manifest(d, path)
        return cls(
            config=d["config"],
            fingerprint=d["fingerprint"],
            layers=[LayerSpec.from_json(x) for x in d["layers"]],
            quantization=d.get("quantization"),
            format_version=version,
            dense_files=d.get("dense_files", []),
            shard=d.get("shard"),
        )


@contextmanager
def staged_directory(out: Path, *, needs: int | None = None) -> Iterator[Path]:
    """A fresh temporary directory beside `out` for the block to fill; renamed to `out` (replacing
    it) when the block succeeds, removed when anything fails: a half-written directory never looks
    complete. `needs`: the output's size, if known, checked against the free space first; a full
    disk becomes one line naming the place and the bytes needed (node.disk_space)."""
    from flashmesh.node import disk_space

    out = Path(out)
    if needs is not None:
        disk_space.check_space(out, needs)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        written = disk_space.tree_bytes(tmp) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in disk_space.FULL:
            raise disk_space.disk_full(out, needs=needs, written=written) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def fingerprint(config: dict, layers: list[LayerSpec], dense_checksums: list[str]) -> str:
    """Identity of the full model: config, expert tensor tables and every record's checksum."""
    h = xxhash.xxh3_128()
    h.update(json.dumps(config, sort_keys=True).encode())
    for s in layers:
        h.update(json.dumps([s.layer, s.module, s.kind, s.top_k, [asdict(t) for t in s.tensors]]).encode())
        h.update("".join(s.checksums).encode())
    h.update("".join(dense_checksums).encode())
    return h.hexdigest()
