"""Serving experts from an iPhone bundle's own files (`flashmesh node serve --bundle OUT.flashmesh-ios`).

The bundle's `experts/layer_XXX.bin` records are read exactly as a store's are (ExpertStore's aligned
parallel preads of whole 16 KiB-aligned records, page cache bypassed with O_DIRECT / F_NOCACHE,
checksum verified against the bundle manifest), then turned into what mlx-lm's expert modules take:

  float16 records (unquantized store)   -> float32 weights: MLX's CPU gather_mm computes in float32,
                                           so each record is upcast once when it is loaded; the cache
                                           then holds 2x the record's bytes (counted in its budget)
  float16_cpu_dequant (affine, iOS 18)  -> the packed uint32 weights as they are, fp16 scales/biases
                                           upcast to float32, computed by QuantizedSwitchLinear
  int8 (affine, iOS 26)                 -> values re-packed into MLX's affine uint32 layout, scales and
                                           biases to float32, computed by QuantizedSwitchLinear

The node reports the bundle's `store_fingerprint`, so a coordinator holding the dense part of the
store the bundle was exported from accepts it like any node of that store.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmesh.node.bundle_format import PROJ, edited_sections, layer_specs, load_manifest
from flashmesh.node.experts import expert_templates_from_config
from flashmesh.node.shard import shard_experts
from flashmesh.node.store_format import LayerSpec, Manifest, layout_record
from flashmesh.node.store_reader import ExpertStore
from flashmesh.protos import PROTOCOL_VERSION
from flashmesh.protos.errors import UserError

COMPUTE_DTYPE = "float32"  # what MLX's CPU gather_mm / gather_qmm take alongside float32 activations


def pack_affine(q: mx.array, bits: int) -> mx.array:
    """uint32 values [R, C] -> MLX affine packing (first value in the lowest bits) [R, C*bits/32]."""
    per_word = 32 // bits
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    words = q.reshape(*q.shape[:-1], q.shape[-1] // per_word, per_word) << shifts
    return words.sum(axis=-1).astype(mx.uint32)  # disjoint bit fields: the sum is their OR


class BundleExpertSource(ExpertStore):
    """The expert records of a bundle as a node's expert source (see node.expert_source)."""

    remedy = "re-copy or re-export the bundle"

    def __init__(
        self,
        bundle: Path,
        *,
        page_cache: bool = False,
        verify: bool = True,
        queue_depth: int = 8,
        shard: dict | None = None,
    ) -> None:
        """`shard` ({"index", "count", "replicas"}) serves only the experts `flashmesh shard` would put in
        that shard of the store; records are still read in place from the whole bundle's files."""
        bundle = Path(bundle)
        if shard is not None:
            count, index, replicas = shard["count"], shard["index"], shard.get("replicas", 1)
            if count < 1 or not 0 <= index < count or not 1 <= replicas <= count:
                raise UserError(f"shard {index} of {count} with {replicas} replicas: need 0 <= index < count, "
                                 "1 <= replicas <= count")  # fmt: skip
            shard = {"index": index, "count": count, "replicas": replicas}
        self.bundle_manifest = load_manifest(bundle)
        edited = edited_sections(self.bundle_manifest)
        if edited:
            raise UserError(f"{bundle}/manifest.json: section {edited[0]!r} was edited; re-export the bundle")
        if self.bundle_manifest["protocol_version"] != PROTOCOL_VERSION:
            raise UserError(
                f"{bundle} speaks node protocol {self.bundle_manifest['protocol_version']}, this flashmesh "
                f"{PROTOCOL_VERSION}; re-export the bundle with this flashmesh"
            )
        quant = self.bundle_manifest["quantization"]
        self.expert_input = quant["expert_input"]
        self.bits = quant.get("bits")
        self.offset = quant.get("int8_offset", 0)
        self.quantization = quant.get("experts")
        records = layer_specs(self.bundle_manifest)
        for spec in records.values():
            path = bundle / spec.file
            expected = len(spec.experts) * spec.record_size
            if not path.is_file() or path.stat().st_size < expected:
                got = path.stat().st_size if path.is_file() else "missing"
                raise UserError(f"{path}: {got} of {expected} bytes; the bundle is incomplete, re-copy or re-export it")
        layers = [self._ram_spec(s, shard) for s in sorted(records.values(), key=lambda s: s.layer)]
        manifest = Manifest(
            config=self.bundle_manifest["config"],
            fingerprint=self.bundle_manifest["store_fingerprint"],
            layers=layers,
            quantization=self.quantization,
            shard=shard,
        )
        super().__init__(
            bundle,
            page_cache=page_cache,
            verify=verify,
            queue_depth=queue_depth,
            manifest=manifest,
            record_specs=records,
        )

    def _ram_spec(self, record: LayerSpec, shard: dict | None) -> LayerSpec:
        """The layer as the cache holds it: the converted tensors (their bytes are what the budget counts),
        with the flash record's size, and the experts served (all, or the shard's) with their checksums."""
        arrays = {}
        for t in record.tensors:
            shape = tuple(t.shape)
            if t.name.endswith(".weight") and self.expert_input == "float16":
                arrays[t.name] = (COMPUTE_DTYPE, shape, 4 * int(np.prod(shape)))
            elif t.name.endswith(".weight"):  # packed uint32 (as stored, or re-packed from int8)
                cols = shape[-1] if self.expert_input == "float16_cpu_dequant" else shape[-1] * self.bits // 32
                arrays[t.name] = ("uint32", (*shape[:-1], cols), 4 * int(np.prod(shape[:-1])) * cols)
            else:  # scales, biases
                arrays[t.name] = (COMPUTE_DTYPE, shape, 4 * int(np.prod(shape)))
        tensors, _ = layout_record(arrays)
        experts = record.experts
        if shard is not None:
            wanted = set(shard_experts(record.num_experts, **shard))
            experts = [e for e in record.experts if e in wanted]
        return LayerSpec(
            record.layer, record.module, record.num_experts, record.record_size, tensors, experts,
            [record.record_checksum(e) for e in experts], record.file, top_k=record.top_k, kind=record.kind,
            input_dim=record.input_dim,
        )  # fmt: skip

    def _arrays(self, raw: mx.array, skew: int, spec: LayerSpec) -> dict[str, mx.array]:
        # Runs on the caller's (MLX) thread; ExpertStore._finish evaluates the results, so the fp16
        # record buffer is converted once per load and then dropped.
        out = {}
        for name, a in super()._arrays(raw, skew, spec).items():  # views of the record
            if name.endswith(".weight") and self.expert_input == "int8":
                a = pack_affine((a.astype(mx.int16) + self.offset).astype(mx.uint32), self.bits)
            elif a.dtype != mx.uint32:
                a = a.astype(mx.float32)
            out[name] = a
        return out

    def templates(self) -> dict[int, nn.Module]:
        quantized = self.expert_input != "float16"
        templates = expert_templates_from_config(
            self.manifest.config, self.manifest.layers, quantization=self.quantization if quantized else None
        )
        missing = sorted(set(self._layers) - set(templates))
        if missing:
            raise UserError(f"{self.path}: MoE layers {missing} have no routed-expert module in the model config")
        names = {f"{p}.{s}" for p in PROJ for s in (("weight", "scales", "biases") if quantized else ("weight",))}
        for spec in self._specs.values():
            if {t.name for t in spec.tensors} != names:
                raise UserError(f"{self.path}: layer {spec.layer} records hold {[t.name for t in spec.tensors]}")
        return templates
