"""Expert records of the bundle: the store's records turned into the expert kernel's input layout.

Choices (docs/ios.md):
  unquantized store -> float16 records: gate/up [I, H], down [H, I]; the record is the kernel input.
  affine store, iOS 18 -> the store's packed uint32 weights with fp16 scales/biases; the app
      dequantizes on the CPU into the fp16 kernel inputs (flash bytes stay at the quantized size).
  affine store, iOS 26 -> int8 weights [I, H] (one value per byte) with fp16 scales/biases: the
      kernel takes int8 inputs and dequantizes in the program.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flashmesh.mobile_export.bundle_format import unpack_affine
from flashmesh.node.bundle_format import PROJ
from flashmesh.node.store_format import LayerSpec, Manifest, checksum, layout_record
from flashmesh.node.store_reader import ExpertStore
from flashmesh.protos.errors import UserError

INT8_OFFSET = {8: 128}  # 8-bit values 0..255 are stored as q - 128; smaller widths fit int8 as they are


def expert_input_mode(quant: dict | None, target: str) -> str:
    if not quant:
        return "float16"
    return "int8" if target == "iOS26" else "float16_cpu_dequant"


def _store_arrays(raw: bytes, spec: LayerSpec) -> dict[str, np.ndarray]:
    out = {}
    for t in spec.tensors:
        count = int(np.prod(t.shape)) if t.shape else 1
        if t.dtype == "bfloat16":
            u = np.frombuffer(raw, np.uint16, count, t.offset).astype(np.uint32) << 16
            out[t.name] = u.view(np.float32).reshape(t.shape)
        else:
            out[t.name] = np.frombuffer(raw, np.dtype(t.dtype), count, t.offset).reshape(t.shape)
    return out


def convert_record(raw: bytes, spec: LayerSpec, *, mode: str, bits: int | None) -> dict[str, np.ndarray]:
    """One store record -> the bundle record's tensors. Deterministic: verify recomputes it bit for bit."""
    arrays = _store_arrays(raw, spec)
    expected = {
        f"{p}.{s}" for p in PROJ for s in (("weight",) if mode == "float16" else ("weight", "scales", "biases"))
    }
    if set(arrays) != expected:
        extra = sorted(set(arrays) ^ expected)
        raise UserError(
            f"export-ios cannot express expert tensors {extra} of layer {spec.layer} (expects {sorted(expected)})"
        )
    out = {}
    for name, a in arrays.items():
        if name.endswith(".weight") and mode == "int8":
            q = unpack_affine(a, bits).astype(np.int16) - INT8_OFFSET.get(bits, 0)
            out[name] = q.astype(np.int8)
        elif name.endswith(".weight") and mode == "float16_cpu_dequant":
            out[name] = a  # packed uint32, as the store has it
        else:
            out[name] = a.astype(np.float16)
    return out


def record_layout(arrays: dict[str, np.ndarray]):
    return layout_record({k: (v.dtype.name, v.shape, v.nbytes) for k, v in arrays.items()})


def record_bytes(arrays: dict[str, np.ndarray], spec_tensors, record_size: int) -> bytes:
    buf = bytearray(record_size)
    for t in spec_tensors:
        buf[t.offset : t.offset + t.nbytes] = np.ascontiguousarray(arrays[t.name]).tobytes()
    return bytes(buf)


def write_expert_layers(
    store_path: Path, manifest: Manifest, out: Path, *, mode: str, bits: int | None, advance
) -> list[LayerSpec]:
    """Write experts/layer_XXX.bin for every MoE layer; return the bundle's layer specs."""
    (out / "experts").mkdir(exist_ok=True)
    specs = []
    with ExpertStore(store_path, page_cache=True) as store:
        for src in manifest.layers:
            if manifest.shard is not None or len(src.experts) != src.num_experts:
                raise UserError("export-ios needs a full store, not a shard; export from the full store")
            first = convert_record(store.read_raw(src.layer, src.experts[0]), src, mode=mode, bits=bits)
            tensors, record_size = record_layout(first)
            spec = LayerSpec(
                src.layer, src.module, src.num_experts, record_size, tensors, list(src.experts), [],
                top_k=src.top_k, kind=src.kind, input_dim=src.input_dim,
            )  # fmt: skip
            fd = os.open(out / spec.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for i, e in enumerate(src.experts):
                    arrays = (
                        first if i == 0 else convert_record(store.read_raw(src.layer, e), src, mode=mode, bits=bits)
                    )
                    data = record_bytes(arrays, tensors, record_size)
                    os.pwrite(fd, data, i * record_size)
                    spec.checksums.append(checksum(data))
                os.fsync(fd)
            finally:
                os.close(fd)
            specs.append(spec)
            advance(1)
    return specs


def bytes_per_token(manifest: Manifest, quant: dict | None) -> dict[str, int]:
    """Expert bytes read from flash per decoded token (every top-k expert missing the cache), per choice."""
    k = manifest.top_k
    total = {"float16": 0, "float16_cpu_dequant": 0, "int8": 0}
    for s in manifest.layers:
        shapes = {t.name: t.shape for t in s.tensors}
        n = 0
        for p in PROJ:
            shape = shapes[f"{p}.weight"]
            n += int(np.prod(shape)) * (32 // quant["bits"] if quant else 1)
        total["float16"] += k * 2 * n
        if quant:
            groups = 2 * 2 * (n // quant["group_size"])  # fp16 scale + bias per group
            total["float16_cpu_dequant"] += k * (n * quant["bits"] // 8 + groups)
            total["int8"] += k * (n + groups)
    return {m: v for m, v in total.items() if v}
