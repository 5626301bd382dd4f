"""Finding mlx-lm's routed-expert modules in a built model, and building models lazily.

Routed-expert modules are mlx-lm's SwitchGLU / SwitchMLP and any other module whose direct
children are SwitchLinear / QuantizedSwitchLinear: recognised by type, never by model name.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.nn as nn
from flashmesh.node.store_format import StoreError
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import _get_classes, load_model

_SWITCH_LINEARS = (SwitchLinear, QuantizedSwitchLinear)


def find_expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Map module path -> routed-expert module (the module whose children are switch linears)."""
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        children = module.children()
        if any(isinstance(c, _SWITCH_LINEARS) for c in children.values()):
            found[path] = module
    return found


def layer_index(path: str) -> int:
    """The decoder layer a module path belongs to: the first integer component."""
    m = re.search(r"\.(\d+)\.", f".{path}.")
    if m is None:
        raise StoreError(f"cannot tell which layer the expert module {path} belongs to")
    return int(m.group(1))


def quantization_of(linear: nn.Module) -> dict | bool:
    if isinstance(linear, QuantizedSwitchLinear):
        return {"group_size": linear.group_size, "bits": linear.bits, "mode": linear.mode}
    return False


def model_classes(config: dict):
    """mlx-lm's Model and ModelArgs for a config; one-line error for unknown types."""
    try:
        return _get_classes(config)
    except KeyError:
        raise StoreError("config.json has no model_type; is this a Hugging Face / mlx-lm model?") from None
    except (ValueError, TypeError, AttributeError):
        raise StoreError(
            f"model_type {config.get('model_type')!r} is not supported by the installed mlx-lm; "
            "upgrade mlx-lm (`pip install -U mlx-lm`) or pick a model it supports"
        ) from None


def load_lazy(path: Path, *, strict: bool) -> tuple[nn.Module, dict]:
    """mlx-lm's own load_model with every weight left lazy (nothing is read until evaluated)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} has no config.json; point at a model directory") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}/config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise StoreError(f"{path}/config.json must hold a JSON object, not {type(config).__name__}")
    model_classes(config)  # unknown model_type -> one clear line before mlx-lm's own error
    try:
        return load_model(path, lazy=True, strict=strict)
    except FileNotFoundError as e:
        raise StoreError(f"{e}; the model directory needs its *.safetensors files") from None
    # a config mlx-lm's class cannot be built from (a field of the wrong type or value) fails in many ways
    except (ValueError, RuntimeError, OSError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError,
            AssertionError) as e:  # fmt: skip
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"cannot load the model in {path}: {first}") from None


def expert_templates(store_path: Path) -> dict[int, nn.Module]:
    """layer -> the model's routed-expert module, from a lazily built model (no weights read)."""
    model, _ = load_lazy(Path(store_path), strict=False)
    return {layer_index(path): module for path, module in find_expert_modules(model).items()}


def expert_templates_from_config(config: dict, *, quantization: dict | None = None) -> dict[int, nn.Module]:
    """layer -> routed-expert module of a model built from `config` alone (no weight files; MLX draws
    nothing until evaluated). With `quantization` ({bits, group_size, mode}) the expert linears are
    mlx-lm's quantized ones, so they compute with packed weights and scales/biases."""
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
        raise StoreError(f"cannot build a {config.get('model_type')!r} model from its config: {e}") from None
    modules = find_expert_modules(model)
    if quantization:
        for module in modules.values():
            nn.quantize(
                module,
                group_size=quantization["group_size"],
                bits=quantization["bits"],
                mode=quantization.get("mode", "affine"),
                class_predicate=lambda _, m: isinstance(m, SwitchLinear),
            )
    return {layer_index(path): module for path, module in modules.items()}
