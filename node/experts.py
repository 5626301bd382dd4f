"""Building models lazily, and the modules that compute a store's routed experts.

Which modules are routed experts is found once, by `flashmesh pack` tracing the model
(node/expert_banks.py); the store's manifest then names each bank's path and kind, and everything
later (nodes, the coordinator) takes the banks from there.
"""

from __future__ import annotations

from pathlib import Path

import mlx.nn as nn
from flashmesh.node.expert_banks import submodule
from flashmesh.node.stacked_experts import StackedExperts
from flashmesh.node.store_format import LayerSpec, Manifest
from flashmesh.protos.errors import UserError
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import _get_classes, load_model


def quantization_of(linear: nn.Module) -> dict | bool:
    if isinstance(linear, (QuantizedSwitchLinear, nn.QuantizedLinear)):
        return {"group_size": linear.group_size, "bits": linear.bits, "mode": linear.mode}
    return False


def model_classes(config: dict):
    """mlx-lm's Model and ModelArgs for a config; one-line error for unknown types."""
    try:
        return _get_classes(config)
    except KeyError:
        raise UserError("config.json has no model_type; is this a Hugging Face / mlx-lm model?") from None
    except (ValueError, TypeError, AttributeError):
        raise UserError(
            f"model_type {config.get('model_type')!r} is not supported by the installed mlx-lm; "
            "upgrade mlx-lm (`pip install -U mlx-lm`) or pick a model it supports"
        ) from None


def load_lazy(path: Path, *, strict: bool) -> tuple[nn.Module, dict]:
    """mlx-lm's own load_model with every weight left lazy (nothing is read until evaluated)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{path} has no config.json; point at a model directory") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}/config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}/config.json must hold a JSON object, not {type(config).__name__}")
    model_classes(config)  # unknown model_type -> one clear line before mlx-lm's own error
    try:
        return load_model(path, lazy=True, strict=strict)
    except FileNotFoundError as e:
        raise UserError(f"{e}; the model directory needs its *.safetensors files") from None
    # a config mlx-lm's class cannot be built from (a field of the wrong type or value) fails in many ways
    except (ValueError, RuntimeError, OSError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError,
            AssertionError) as e:  # fmt: skip
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the model in {path}: {first}") from None


def bank_template(model: nn.Module, spec: LayerSpec) -> nn.Module:
    """The module computing layer `spec`'s experts: (x [N, D], indices [N, k]) -> [N, k, D].
    A switch bank is the model's own module; a list of expert modules becomes its first entry
    computing every expert (node/stacked_experts.py). Callers swap it out of `model` or drop the model."""
    bank = submodule(model, spec.module)
    if spec.kind == "list":
        return StackedExperts(bank[0], path=f"{spec.module}.0")
    return bank


def bank_templates(model: nn.Module, layers: list[LayerSpec]) -> dict[int, nn.Module]:
    return {spec.layer: bank_template(model, spec) for spec in layers}


def expert_templates(store_path: Path) -> dict[int, nn.Module]:
    """layer -> the store's expert compute module, from a lazily built model (no weights read)."""
    model, _ = load_lazy(Path(store_path), strict=False)
    return bank_templates(model, Manifest.load(store_path).layers)


def expert_templates_from_config(
    config: dict, layers: list[LayerSpec], *, quantization: dict | None = None
) -> dict[int, nn.Module]:
    """layer -> expert compute module of a model built from `config` alone (no weight files; MLX draws
    nothing until evaluated), for the banks `layers` name. With `quantization` ({bits, group_size,
    mode}) the expert linears are mlx-lm's quantized ones, so they compute with packed weights and
    scales/biases."""
    model_class, args_class = model_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (
        TypeError,
        ValueError,
        KeyError,
        AttributeError,
        IndexError,
        ArithmeticError,
        RuntimeError,
        AssertionError,
    ) as e:
        raise UserError(f"cannot build a {config.get('model_type')!r} model from its config: {e}") from None
    if quantization:
        for spec in layers:
            bank = submodule(model, spec.module)
            for module in bank if spec.kind == "list" else [bank]:
                nn.quantize(
                    module,
                    group_size=quantization["group_size"],
                    bits=quantization["bits"],
                    mode=quantization.get("mode", "affine"),
                    class_predicate=lambda _, m: isinstance(m, (SwitchLinear, nn.Linear)),
                )
    return bank_templates(model, layers)
