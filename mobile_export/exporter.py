"""`flashmesh export-ios`: a store -> an iPhone streaming bundle, written atomically (temp dir, rename)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
from flashmesh.mobile_export import programs
from flashmesh.mobile_export.arch import SUPPORTED, arch_for
from flashmesh.mobile_export.bundle_format import MIN_IOS
from flashmesh.mobile_export.mil_ops import WeightRegistry
from flashmesh.mobile_export.records import INT8_OFFSET, bytes_per_token, expert_input_mode, write_expert_layers
from flashmesh.mobile_export.weights import DenseWeights
from flashmesh.node.bundle_format import BUNDLE_FORMAT, save_manifest
from flashmesh.node.experts import load_lazy
from flashmesh.node.store_format import Manifest, checksum, staged_directory
from flashmesh.node.store_writer import TOKENIZER_FILES
from flashmesh.protos import PROTOCOL_VERSION
from flashmesh.protos.errors import UserError
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)


def expert_quantization(manifest: Manifest) -> dict | None:
    """The routed experts' quantization ({bits, group_size, mode}) or None; refuses what the kernel cannot take."""
    spec = manifest.layers[0]
    names = {t.name for t in spec.tensors}
    if "gate_proj.scales" not in names:
        return None
    q = manifest.config.get("quantization") or {}
    q = {**q, **(q.get(f"{spec.module}.gate_proj") or {})}
    mode, bits = q.get("mode", "affine"), q.get("bits")
    if mode != "affine" or bits not in (2, 4, 8):
        raise UserError(
            f"export-ios cannot express {mode} {bits}-bit experts (supported: unquantized, affine 2/4/8-bit)"
        )
    return {"mode": mode, "bits": bits, "group_size": q["group_size"]}


def package_files(package: Path) -> dict[str, str]:
    """Every file inside a package -> its checksum (a flipped byte in weight.bin is found without the store)."""
    return {str(p.relative_to(package)): checksum(p.read_bytes()) for p in sorted(package.rglob("*")) if p.is_file()}


def check_supported(manifest: Manifest) -> None:
    model_type = manifest.config.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(f"export-ios cannot express model_type {model_type!r} (supported: {', '.join(SUPPORTED)})")
    expert_quantization(manifest)


def export_ios(
    store: Path,
    out: Path,
    *,
    target: str = "iOS18",
    chunks: int | None = None,
    context: int = 2048,
    prefill: int = 64,
    force: bool = False,
    show_progress: bool = True,
) -> dict:
    """Write the bundle; return its manifest."""
    store, out = Path(store), Path(out)
    if target not in programs.TARGETS:
        raise UserError(f"--target {target} is unknown (choose iOS18 or iOS26)")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; remove it or pass --force")
    if not 1 <= prefill <= context:
        raise UserError(f"--prefill {prefill} must be between 1 and --context {context}")
    manifest = Manifest.load(store)
    check_supported(manifest)
    start = time.perf_counter()
    with staged_directory(out) as tmp:
        (tmp / "coreml").mkdir()
        bundle = _write_bundle(
            store, manifest, tmp, target=target, chunks=chunks, ctx=context, prefill=prefill, show=show_progress
        )
    log.info("exported %s to %s in %.1f s", store, out, time.perf_counter() - start)
    return bundle


def _write_bundle(store: Path, manifest: Manifest, tmp: Path, *, target, chunks, ctx, prefill, show) -> dict:
    quant = expert_quantization(manifest)
    mode = expert_input_mode(quant, target)
    cfg = manifest.config
    model, _ = load_lazy(store, strict=False)  # mlx-lm's own modules: rope tables and attention scales
    arch = arch_for(cfg, model, ctx=ctx)
    moe = {s.layer for s in manifest.layers}
    segments = programs.plan_segments(cfg["num_hidden_layers"], sorted(moe))
    dense = DenseWeights(store, manifest)
    reg = WeightRegistry(dense)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not show, transient=False) as progress:
        rec_task = progress.add_task("expert records", total=len(manifest.layers))
        specs = write_expert_layers(
            store,
            manifest,
            tmp,
            mode=mode,
            bits=quant and quant["bits"],
            advance=lambda n: progress.advance(rec_task, n),
        )
        embed = dense.get("model.embed_tokens.weight").astype(np.float16)  # [V, H]
        (tmp / "embeddings.bin").write_bytes(embed.tobytes())
        embeddings = {
            "file": "embeddings.bin",
            "dtype": "float16",
            "shape": list(embed.shape),
            "checksum": checksum(embed.tobytes()),
        }
        del embed

        seg_task = progress.add_task("dense segments", total=len(segments))
        parts = tmp / "_parts"
        parts.mkdir()
        for seg in segments:
            for fn, t in (("decode", 1), ("prefill", prefill)):
                prog = programs.build_segment(arch, reg, seg, t=t, target=target, moe=moe)
                programs.convert(prog, target, parts / f"seg{seg.index}_{fn}.mlpackage")
            seg.weights = dict(reg.used)
            seg.weight_bytes = sum(reg.array(v["key"]).size * np.dtype(v["dtype"]).itemsize for v in reg.used.values())
            reg.used.clear()
            reg.clear_cache()
            progress.advance(seg_task)

        groups = programs.group_segments(segments, chunks)
        pkg_task = progress.add_task("packages", total=len(groups) + 1)
        packages, seg_entries = [], []
        for j, group in enumerate(groups):
            rel = f"coreml/dense_{j:02d}.mlpackage"
            names = {
                f"seg{s.index}_{fn}": parts / f"seg{s.index}_{fn}.mlpackage"
                for s in group
                for fn in ("decode", "prefill")
            }
            programs.merge_functions(names, tmp / rel, default=f"seg{group[0].index}_decode")
            weights = {k: v for s in group for k, v in s.weights.items()}
            packages.append(
                {
                    "path": rel,
                    "segments": [s.index for s in group],
                    "functions": programs.package_io(tmp / rel),
                    "files": package_files(tmp / rel),
                    "weights": weights,
                }
            )
            for s in group:
                seg_entries.append(
                    {
                        "index": s.index,
                        "layers": s.layers,
                        "moe_layer": s.moe_layer,
                        "package": rel,
                        "decode": f"seg{s.index}_decode",
                        "prefill": f"seg{s.index}_prefill",
                        "weight_bytes": s.weight_bytes,
                    }
                )
            progress.advance(pkg_task)
        kernel = _write_kernel(
            tmp, manifest, quant if mode == "int8" else None, target=target, prefill=prefill, parts=parts
        )
        progress.advance(pkg_task)
        shutil.rmtree(parts)

    tokenizer = [name for name in TOKENIZER_FILES if (store / name).is_file()]
    for name in tokenizer:
        shutil.copy2(store / name, tmp / name)
    per_token = bytes_per_token(manifest, quant)
    bundle = {
        "bundle_format": BUNDLE_FORMAT,
        "target": target,
        "min_ios": MIN_IOS[target],
        "protocol_version": PROTOCOL_VERSION,
        "store_fingerprint": manifest.fingerprint,
        "model_type": cfg["model_type"],
        "config": cfg,
        "tokenizer": tokenizer,
        "routing": _routing(cfg, manifest),
        "quantization": {
            "experts": quant,
            "expert_input": mode,
            "int8_offset": INT8_OFFSET.get(quant["bits"], 0) if quant else 0,
            **(quant or {}),
        },
        "embeddings": embeddings,
        "layers": [s.to_json() for s in specs],
        "runtime": {"context": ctx, "prefill_tokens": prefill, "kernel_slots": manifest.top_k},
        "segments": seg_entries,
        "coreml": {"packages": packages, "kernel": kernel},
        "bytes_per_token": {
            "choices": per_token,
            "this_bundle_payload": per_token[mode],
            "this_bundle_records": manifest.top_k * sum(s.record_size for s in specs),
        },
    }
    save_manifest(tmp, bundle)
    return bundle


def _routing(cfg: dict, manifest: Manifest) -> dict:
    out = {
        "moe_layers": [s.layer for s in manifest.layers],
        "experts_per_layer": {str(s.layer): s.num_experts for s in manifest.layers},
        "top_k": manifest.top_k,
        # mixtral always renormalises: its weights are the softmax of the chosen logits
        "norm_topk_prob": cfg.get("norm_topk_prob", cfg["model_type"] == "mixtral"),
    }
    if cfg["model_type"] == "deepseek_v3":
        out |= {
            "scoring": "sigmoid_group",
            "n_group": cfg.get("n_group", 1),
            "topk_group": cfg.get("topk_group", 1),
            "routed_scaling_factor": cfg.get("routed_scaling_factor", 1.0),
            "shared_experts": cfg.get("n_shared_experts"),
        }
    else:
        out["scoring"] = "softmax"
    return out


def _write_kernel(tmp: Path, manifest: Manifest, quant: dict | None, *, target: str, prefill: int, parts: Path) -> dict:
    shapes = {t.name: t.shape for t in manifest.layers[0].tensors}
    inter, hidden = shapes["gate_proj.weight"][0], manifest.config["hidden_size"]  # gate [I, H] (or packed)
    if "down_proj.weight" in shapes and shapes["down_proj.weight"][0] != hidden:
        raise UserError(
            f"export-ios: expert down_proj has shape {shapes['down_proj.weight']}, expected [{hidden}, ...]"
        )
    kq = None if quant is None else {**quant, "offset": INT8_OFFSET.get(quant["bits"], 0)}
    names = {}
    for fn, t in (("decode", 1), ("prefill", prefill)):
        prog = programs.build_kernel(hidden=hidden, inter=inter, k=manifest.top_k, t=t, target=target, quant=kq)
        names[fn] = parts / f"kernel_{fn}.mlpackage"
        programs.convert(prog, target, names[fn])
    rel = "coreml/experts_kernel.mlpackage"
    programs.merge_functions(names, tmp / rel, default="decode")
    return {
        "path": rel,
        "functions": programs.package_io(tmp / rel),
        "files": package_files(tmp / rel),
        "slots": manifest.top_k,
        "hidden": hidden,
        "intermediate": inter,
    }
