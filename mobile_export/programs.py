"""The dense part as Core ML programs: segments between routers, decode + prefill functions, KV states.

The dense part is cut at every router: segment 0 takes the embedding rows and runs up to the first
MoE layer's router; segment i takes (h, y) = (residual, expert output) of the previous MoE layer and
runs up to the next router; the last segment ends in the LM head. Between segments the app runs the
expert kernel. Each segment has a `seg{i}_decode` (T=1) and a `seg{i}_prefill` (T=prefill) function
over the same weights and the same KV states; consecutive segments are grouped into packages under
1 GB (multifunction .mlpackage, weights deduplicated across functions).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types
from coremltools.converters.mil.mil.passes import pass_pipeline as _pass_pipeline
from flashmesh.mobile_export import mil_ops as ops
from flashmesh.mobile_export.arch import Arch
from flashmesh.mobile_export.bundle_format import PACKAGE_LIMIT_BYTES
from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)

# coremltools draws a tqdm bar per conversion; the exporter draws its own progress.
_pass_pipeline.tqdm = partial(_pass_pipeline.tqdm, disable=True)

TARGETS = {"iOS18": ct.target.iOS18, "iOS26": ct.target.iOS26}
_DT = {"fp16": types.fp16, "fp32": types.fp32, "int32": types.int32, "int8": types.int8}


@dataclass
class Segment:
    index: int
    layers: list[int]
    moe_layer: int | None  # the router this segment ends at; None for the head segment
    weight_bytes: int = 0
    weights: dict = field(default_factory=dict)  # const name -> store tensor


def plan_segments(num_layers: int, moe_layers: list[int]) -> list[Segment]:
    segments, current = [], []
    for layer in range(num_layers):
        current.append(layer)
        if layer in moe_layers:
            segments.append(Segment(len(segments), current, layer))
            current = []
    segments.append(Segment(len(segments), current, None))
    return segments


def convert(prog: Program, target: str, path: Path) -> None:
    """Save a MIL program as it was built: no graph passes, so the saved ops are exactly the emitted ones."""
    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=TARGETS[target],
        compute_precision=ct.precision.FLOAT32,  # keeps the fp16/fp32 types as built; no automatic casts
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )
    model.save(str(path))


def build_segment(arch: Arch, reg: ops.WeightRegistry, seg: Segment, *, t: int, target: str, moe: set[int]) -> Program:
    """One segment's function for T tokens. Shapes: x/h/y [1, T, H] fp16, positions [T] int32,
    mask [1, 1, T, C] fp16 (0 = attend, -inf = not), logits [1, T, V] fp16."""
    hsz, ctx = arch.hidden, arch.ctx
    specs: dict = {}
    if seg.index == 0:
        specs["x_embed"] = mb.TensorSpec((1, t, hsz), dtype=types.fp16)
    else:
        specs["h_in"] = mb.TensorSpec((1, t, hsz), dtype=types.fp16)
        specs["y_in"] = mb.TensorSpec((1, t, hsz), dtype=types.fp16)
    if seg.layers:
        specs["positions"] = mb.TensorSpec((t,), dtype=types.int32)
        specs["mask"] = mb.TensorSpec((1, 1, t, ctx), dtype=types.fp16)
    for layer in seg.layers:
        for st in arch.states(layer):
            specs[st.name] = mb.StateTensorSpec(tuple(st.shape), dtype=types.fp16)
    with Function(specs, opset_version=TARGETS[target]) as func:
        inp = func.inputs
        x = inp["x_embed"] if seg.index == 0 else mb.add(x=inp["h_in"], y=inp["y_in"])
        outputs = []
        for layer in seg.layers:
            p = arch.prefix(layer)
            xa = ops.rms_norm(x, reg.const(f"{p}.input_layernorm.weight", "float32"), arch.eps)
            h = mb.add(x=x, y=arch.attention(reg, xa, layer, inp["positions"], inp["mask"], inp, t))
            xn = ops.rms_norm(h, reg.const(f"{p}.post_attention_layernorm.weight", "float32"), arch.eps)
            if layer in moe:
                ids, weights = arch.router(reg, xn, layer, t)
                shared = arch.shared_experts(reg, xn, layer)
                if shared is not None:
                    h = mb.add(x=h, y=shared)
                outputs = [
                    mb.identity(x=h, name="h"),
                    mb.identity(x=xn, name="xn"),
                    mb.identity(x=ids, name="expert_ids"),
                    mb.identity(x=weights, name="expert_weights"),
                ]
            else:
                x = mb.add(x=h, y=arch.dense_mlp(reg, xn, layer))
        if seg.moe_layer is None:
            xf = ops.rms_norm(x, reg.const("model.norm.weight", "float32"), arch.eps)
            outputs = [mb.linear(x=xf, weight=reg.const(arch.lm_head_key()), name="logits")]
        func.set_outputs(outputs)
    prog = Program()
    prog.add_function("main", func)
    return prog


def build_kernel(*, hidden: int, inter: int, k: int, t: int, target: str, quant: dict | None) -> Program:
    """The expert kernel: y = sum_s w[:, s] * down_s(silu(gate_s x) * up_s x) over k expert slots.

    x [T, H] fp16, w [T, k] fp16 (0 where a token did not pick the slot's expert);
    fp16 mode: gate/up [k, I, H], down [k, H, I] fp16.
    int8 mode (iOS 26): gate_q/up_q int8 [k, I, H], down_q int8 [k, H, I], *_scales/*_biases fp16
    [k, rows, cols/group]; w = (q + offset) * scale + bias per group. -> y [T, H] fp16"""
    shapes = {"gate": (k, inter, hidden), "up": (k, inter, hidden), "down": (k, hidden, inter)}
    specs = {"x": mb.TensorSpec((t, hidden), dtype=types.fp16), "w": mb.TensorSpec((t, k), dtype=types.fp16)}
    for name, shape in shapes.items():
        if quant is None:
            specs[name] = mb.TensorSpec(shape, dtype=types.fp16)
        else:
            groups = (*shape[:2], shape[2] // quant["group_size"])
            specs[f"{name}_q"] = mb.TensorSpec(shape, dtype=types.int8)
            specs[f"{name}_scales"] = mb.TensorSpec(groups, dtype=types.fp16)
            specs[f"{name}_biases"] = mb.TensorSpec(groups, dtype=types.fp16)
    with Function(specs, opset_version=TARGETS[target]) as func:
        inp = func.inputs
        mats = {}
        for name, shape in shapes.items():
            if quant is None:
                mats[name] = inp[name]
                continue
            g = quant["group_size"]
            q = mb.reshape(x=mb.cast(x=inp[f"{name}_q"], dtype="fp16"), shape=[*shape[:2], shape[2] // g, g])
            if quant.get("offset"):
                q = mb.add(x=q, y=np.float16(quant["offset"]))
            s = mb.expand_dims(x=inp[f"{name}_scales"], axes=[-1])
            b = mb.expand_dims(x=inp[f"{name}_biases"], axes=[-1])
            mats[name] = mb.reshape(x=mb.add(x=mb.mul(x=q, y=s), y=b), shape=list(shape))
        xb = mb.expand_dims(x=inp["x"], axes=[0])  # [1, T, H]
        gate = mb.matmul(x=xb, y=mats["gate"], transpose_y=True)  # [k, T, I]
        up = mb.matmul(x=xb, y=mats["up"], transpose_y=True)
        out = mb.matmul(x=mb.mul(x=mb.silu(x=gate), y=up), y=mats["down"], transpose_y=True)  # [k, T, H]
        wk = mb.expand_dims(x=mb.transpose(x=inp["w"], perm=[1, 0]), axes=[-1])  # [k, T, 1]
        y = mb.reduce_sum(x=mb.mul(x=out, y=wk), axes=[0], name="y")  # [T, H]
        func.set_outputs([y])
    prog = Program()
    prog.add_function("main", func)
    return prog


def group_segments(segments: list[Segment], chunks: int | None) -> list[list[Segment]]:
    """Contiguous groups of segments, each under the package limit; `chunks` fixes their number."""
    for s in segments:
        if s.weight_bytes >= PACKAGE_LIMIT_BYTES:
            raise UserError(
                f"segment {s.index} (layers {s.layers}) holds {s.weight_bytes / 1e9:.2f} GB of weights, over the "
                "1 GB package limit; export-ios cannot split one segment yet"
            )
    if chunks is None:
        groups, size = [[]], 0
        for s in segments:
            if groups[-1] and size + s.weight_bytes >= PACKAGE_LIMIT_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += s.weight_bytes
        return groups
    if not 1 <= chunks <= len(segments):
        raise UserError(f"--chunks {chunks}: this model has {len(segments)} dense segments; pick 1..{len(segments)}")
    per, extra = divmod(len(segments), chunks)  # contiguous, equal counts (segments are alike in size)
    groups, start = [], 0
    for j in range(chunks):
        n = per + (j < extra)
        groups.append(segments[start : start + n])
        start += n
    for j, g in enumerate(groups):
        if sum(s.weight_bytes for s in g) >= PACKAGE_LIMIT_BYTES:
            raise UserError(f"--chunks {chunks} puts over 1 GB of weights in package {j}; use more chunks")
    return groups


def merge_functions(parts: dict[str, Path], out: Path, default: str) -> None:
    """Several single-function packages -> one multifunction package (shared weights stored once)."""
    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in parts.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = default
    ct.utils.save_multifunction(desc, str(out))
    for path in parts.values():
        shutil.rmtree(path, ignore_errors=True)


_SPEC_DT = {65552: "float16", 65568: "float32", 131104: "int32", 131080: "int8"}


def _feature(f) -> dict:
    kind = f.type.WhichOneof("Type")
    arr = f.type.stateType.arrayType if kind == "stateType" else f.type.multiArrayType
    return {"name": f.name, "dtype": _SPEC_DT.get(arr.dataType, str(arr.dataType)), "shape": list(arr.shape)}


def package_io(path: Path) -> dict[str, dict]:
    """function name -> {inputs, outputs, states} as the saved package declares them."""
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return {
        fn.name: {
            "inputs": [_feature(f) for f in fn.input],
            "outputs": [_feature(f) for f in fn.output],
            "states": [_feature(f) for f in fn.state],
        }
        for fn in spec.description.functions
    }
