"""What the capacity planner needs to know of a model, read off mlx-lm's model built from its config
without weights (MLX draws nothing until evaluated): the MoE layers, experts per layer, bytes per
expert, top-k, and the dense part's bytes.

- Layers, experts and top-k: the expert banks a traced forward pass of the built model routes
  among (node.expert_banks, as `flashmesh pack` finds them); `--top-k` overrides k.
- Bytes: the built model's parameters after quantizing it as the config says (mlx-lm's
  `quantization`, per-path overrides included), at the width of the weights' float dtype: read from
  the safetensors headers of a model directory, from a store's own records, else the config's
  `torch_dtype`/`dtype` (the one fact taken from a key name; bf16 when absent).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from flashmesh.coordinator.placement import LayerShape
from flashmesh.node.expert_banks import find_expert_banks
from flashmesh.node.experts import model_classes
from flashmesh.node.store_format import MANIFEST, Manifest
from flashmesh.protos.errors import UserError
from mlx.utils import tree_flatten

_FLOAT_BYTES = {"float32": 4, "F32": 4, "float16": 2, "F16": 2, "bfloat16": 2, "BF16": 2}


@dataclass(frozen=True)
class ModelFacts:
    name: str
    model_type: str
    layers: list[LayerShape]  # every MoE layer: its experts and one expert's bytes
    top_k: int
    dense_bytes: int  # every parameter outside the routed experts (RAM on the coordinator)
    dense_read_bytes: int  # of those, the bytes one decode token multiplies (an embedding: one row)
    quantization: str
    notes: list[str] = field(default_factory=list)

    @property
    def expert_bytes_total(self) -> int:
        return sum(s.num_experts * s.payload_bytes for s in self.layers)

    @property
    def active_expert_bytes(self) -> int:
        """Routed-expert bytes one token uses: top-k of every MoE layer."""
        return sum(self.top_k * s.payload_bytes for s in self.layers)

    def to_json(self) -> dict:
        return {
            "name": self.name, "model_type": self.model_type, "moe_layers": len(self.layers),
            "experts_per_layer": sorted({s.num_experts for s in self.layers}), "top_k": self.top_k,
            "expert_bytes": sorted({s.payload_bytes for s in self.layers}),
            "expert_bytes_total": self.expert_bytes_total,
            "active_expert_bytes_per_token": self.active_expert_bytes, "dense_bytes": self.dense_bytes,
            "dense_read_bytes_per_token": self.dense_read_bytes, "quantization": self.quantization, "notes": self.notes,
        }  # fmt: skip


def _quantize(model: nn.Module, quantization: dict) -> None:
    """As mlx-lm's loader does, without weights to look at: every quantizable module (dimensions
    divisible by the group size) unless the config names its path otherwise."""
    group, bits, mode = quantization.get("group_size", 64), quantization["bits"], quantization.get("mode", "affine")

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        weight = getattr(module, "weight", None)
        return hasattr(module, "to_quantized") and weight is not None and weight.shape[-1] % group == 0

    nn.quantize(model, group_size=group, bits=bits, mode=mode, class_predicate=predicate)


def _bytes(params: dict[str, mx.array], float_bytes: int) -> int:
    """Stored bytes: packed integer tensors as they are, float tensors at the weights' float width."""
    return sum(a.nbytes if not mx.issubdtype(a.dtype, mx.floating) else a.size * float_bytes for a in params.values())


def _text_config(config: dict) -> dict:
    return config.get("text_config", config)


def facts_from_config(
    config: dict, *, name: str, float_bytes: int | None = None, bits: int | None = None, top_k: int | None = None
) -> ModelFacts:
    """Facts of the model `config` describes. bits: plan as if quantized (affine, group 64) to that width."""
    notes = []
    if float_bytes is None:
        dtype = _text_config(config).get("torch_dtype") or _text_config(config).get("dtype") or "bfloat16"
        float_bytes = _FLOAT_BYTES.get(str(dtype), 2)
        notes.append(f"weights' float width from the config's dtype ({dtype})")
    quantization = {"bits": bits, "group_size": 64, "mode": "affine"} if bits else config.get("quantization")
    model_class, args_class = model_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"cannot build a {config.get('model_type')!r} model from its config: {e}") from None
    banks = find_expert_banks(model)
    if not banks:
        raise UserError(f"{name} is a dense model: it has no routed experts to stream")
    expert_paths = tuple(f"{b.path}." for b in banks)
    probed = max(b.top_k for b in banks)
    if top_k is not None and top_k != probed:
        notes.append(f"top-k {top_k} instead of the model's {probed}")
    if quantization:
        _quantize(model, quantization)
    params = dict(tree_flatten(model.parameters()))
    layers = []
    for bank in banks:
        tensors = {k: v for k, v in params.items() if k.startswith(f"{bank.path}.")}
        layers.append(LayerShape(bank.layer, bank.num_experts, _bytes(tensors, float_bytes) // bank.num_experts))
    dense = {k: v for k, v in params.items() if not k.startswith(expert_paths)}
    dense_bytes = _bytes(dense, float_bytes)
    embedding = sum(
        _bytes(dict(tree_flatten(m.parameters())), float_bytes)
        for _, m in model.named_modules()
        if isinstance(m, nn.Embedding | nn.QuantizedEmbedding)
    )
    tied = not any(
        isinstance(m, nn.Linear | nn.QuantizedLinear) and p.endswith("lm_head") for p, m in model.named_modules()
    )
    q = (
        f"{quantization['bits']}-bit {quantization.get('mode', 'affine')}"
        if quantization
        else f"{8 * float_bytes}-bit float"
    )
    return ModelFacts(
        name=name, model_type=str(config.get("model_type")), layers=layers, top_k=top_k or probed,
        dense_bytes=dense_bytes, dense_read_bytes=dense_bytes - (0 if tied else embedding), quantization=q, notes=notes,
    )  # fmt: skip


def _safetensors_float_bytes(directory: Path) -> int | None:
    """The float width of the first floating tensor in the directory's safetensors headers."""
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, entry in header.items():
            if key != "__metadata__" and entry["dtype"] in _FLOAT_BYTES:
                return _FLOAT_BYTES[entry["dtype"]]
    return None


def _store_float_bytes(manifest: Manifest) -> int:
    for spec in manifest.layers:
        for t in spec.tensors:
            if t.dtype in _FLOAT_BYTES:
                return _FLOAT_BYTES[t.dtype]
    return 2


def load_facts(model: str, *, bits: int | None = None, top_k: int | None = None) -> ModelFacts:
    """MODEL: a store, a model directory, a config.json, or a hub id (only its config.json is fetched)."""
    path = Path(model).expanduser()
    if (path / MANIFEST).is_file():
        manifest = Manifest.load(path)
        facts = facts_from_config(manifest.config, name=path.name, float_bytes=_store_float_bytes(manifest),
                                  bits=bits, top_k=top_k)  # fmt: skip
        if bits is None:  # the store's records are the truth for expert bytes
            layers = [LayerShape(s.layer, s.num_experts, s.payload_bytes) for s in manifest.layers]
            facts = ModelFacts(**{**facts.__dict__, "layers": layers})
        return facts
    if path.is_file():
        config_file, directory = path, path.parent
    elif path.is_dir():
        config_file, directory = path / "config.json", path
    else:
        config_file, directory = _hub_config(model), None
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{config_file} does not exist; give a store, a model directory or its config.json") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON ({e})") from None
    float_bytes = _safetensors_float_bytes(directory) if directory is not None else None
    if path.is_file() and path.name != "config.json":
        name = path.stem
    else:
        name = directory.resolve().name if directory is not None else model
    return facts_from_config(config, name=name, float_bytes=float_bytes, bits=bits, top_k=top_k)


def _hub_config(model_id: str) -> Path:
    if model_id.count("/") != 1 or model_id.startswith((".", "/")):
        raise UserError(f"{model_id} does not exist; give a store, a model directory, a config.json or a hub id")
    from flashmesh.node.store_writer import from_hub
    from huggingface_hub import hf_hub_download

    return from_hub(model_id, lambda: hf_hub_download(model_id, "config.json"), what="its config.json",
                    fix="a config.json")  # fmt: skip
