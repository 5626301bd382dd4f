"""The iPhone bundle as the phone sees it: its limits, and a NumPy reader of its expert records.

The layout of the directory and its manifest are node.bundle_format's (a node serves a bundle's
records too). `BundleExperts` is the reader: one aligned pread per record, checksum verified, tensors as numpy
arrays, plus `kernel_inputs` which turns records into the expert kernel's input arrays (CPU
dequantization for the iOS 18 path). A node serving from a bundle plugs these two in.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flashmesh.node.bundle_format import PROJ, layer_specs, load_manifest
from flashmesh.node.store_format import RECORD_ALIGN, LayerSpec, checksum
from flashmesh.protos.codec import DTYPES
from flashmesh.protos.errors import UserError

MIN_IOS = {"iOS18": "18.0", "iOS26": "26.0"}
PACKAGE_LIMIT_BYTES = 1_000_000_000  # each .mlpackage stays under 1 GB


def tensors_from_record(buf, spec: LayerSpec) -> dict[str, np.ndarray]:
    """Views (no copy) of one record's tensors; `buf` is the record's bytes."""
    out = {}
    for t in spec.tensors:
        dtype = DTYPES[t.dtype][0]  # little-endian numpy dtypes, as the records hold them
        count = int(np.prod(t.shape)) if t.shape else 1
        out[t.name] = np.frombuffer(buf, dtype=dtype, count=count, offset=t.offset).reshape(t.shape)
    return out


def unpack_affine(packed: np.ndarray, bits: int) -> np.ndarray:
    """mlx affine packing (values little-end first in each uint32) -> uint8 values. [R, C*bits/32] -> [R, C]"""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    vals = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per_word).astype(np.uint8)


def dequantize_affine(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """q [R, C] values, scales/biases [R, C/group] -> fp32 [R, C] (w = scale * q + bias)."""
    r, c = q.shape
    g = q.reshape(r, c // group_size, group_size).astype(np.float32)
    w = g * scales.astype(np.float32)[..., None] + biases.astype(np.float32)[..., None]
    return w.reshape(r, c)


class BundleExperts:
    """Reads expert records of a bundle: one pread per record, checksum verified."""

    def __init__(self, bundle: Path, *, verify: bool = True) -> None:
        self.path = Path(bundle)
        self.manifest = load_manifest(self.path)
        self.specs = layer_specs(self.manifest)
        self.verify = verify
        self.expert_input = self.manifest["quantization"]["expert_input"]
        self._fds = {layer: os.open(self.path / s.file, os.O_RDONLY) for layer, s in self.specs.items()}

    def read_raw(self, layer: int, expert: int) -> bytes:
        spec = self.specs[layer]
        data = os.pread(self._fds[layer], spec.record_size, spec.record_offset(expert))
        if len(data) != spec.record_size:
            raise UserError(f"{self.path / spec.file}: layer {layer} expert {expert} record is truncated")
        if self.verify and checksum(data) != spec.record_checksum(expert):
            raise UserError(f"{self.path / spec.file}: layer {layer} expert {expert} record checksum mismatch")
        return data

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """One expert's record tensors as numpy arrays (names as in the manifest's tensor table)."""
        return tensors_from_record(self.read_raw(layer, expert), self.specs[layer])

    def kernel_inputs(self, layer: int, experts: list[int]) -> dict[str, np.ndarray]:
        """The expert kernel's weight inputs for `experts` (slot order), stacked: e.g. gate [k, I, H]."""
        records = [self.read(layer, e) for e in experts]
        return stack_kernel_inputs(records, self.manifest["quantization"])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> BundleExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


KERNEL_NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def stack_kernel_inputs(records: list[dict[str, np.ndarray]], quantization: dict) -> dict[str, np.ndarray]:
    """Records -> kernel inputs. fp16: gate/up [k, I, H], down [k, H, I]. iOS 18 + quantized store: the
    CPU dequantizes into those fp16 buffers. int8 (iOS 26): gate_q int8 [k, I, H] with gate_scales and
    gate_biases fp16 [k, I, H/group] (and the same for up, down)."""
    mode = quantization["expert_input"]
    out: dict[str, np.ndarray] = {}
    for proj in PROJ:
        name = KERNEL_NAMES[proj]
        if mode == "float16":
            out[name] = np.stack([r[f"{proj}.weight"] for r in records])
        elif mode == "float16_cpu_dequant":
            bits, group = quantization["bits"], quantization["group_size"]
            ws = [
                dequantize_affine(
                    unpack_affine(r[f"{proj}.weight"], bits), r[f"{proj}.scales"], r[f"{proj}.biases"], group
                )
                for r in records
            ]
            out[name] = np.stack(ws).astype(np.float16)
        elif mode == "int8":
            out[f"{name}_q"] = np.stack([r[f"{proj}.weight"] for r in records])
            out[f"{name}_scales"] = np.stack([r[f"{proj}.scales"] for r in records])
            out[f"{name}_biases"] = np.stack([r[f"{proj}.biases"] for r in records])
        else:
            raise UserError(f"bundle expert input mode {mode!r} is unknown; re-export the bundle")
    return out


def check_aligned(spec: LayerSpec) -> None:
    if spec.record_size % RECORD_ALIGN:
        raise UserError(f"layer {spec.layer}: record size {spec.record_size} is not {RECORD_ALIGN}-aligned")
