"""Test vectors for the Swift node's `swift test`, written by the Python side from test models.

    python -m flashmesh.testing.swift_vectors OUT_DIR      # `make test` writes mobile_export/ios/.build/vectors

Everything the Swift package must agree with Python on: bundles exported from small random models
(fp16 qwen3_moe and deepseek_v3, affine 4-bit qwen3_moe for iOS 18 and iOS 26) with the Python node's
view of each (manifest figures, refusals of edited manifests with Python's own messages), xxh3 at
every length class, dequantized and re-packed records bit for bit, per-pair expert outputs of the
Python bundle node, every message's bytes (and non-canonical or invalid encodings), and cache
traces under the Python node's default policy. Written fresh each run, so they follow the Python code.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import xxhash
from flashmesh.mobile_export.bundle_format import stack_kernel_inputs, tensors_from_record
from flashmesh.mobile_export.exporter import export_ios
from flashmesh.node.advertise import instance_name, service_info
from flashmesh.node.bundle_format import load_manifest, save_manifest
from flashmesh.node.bundle_source import BundleExpertSource
from flashmesh.node.cache import ExpertCache
from flashmesh.node.service import NodeService
from flashmesh.node.store_format import staged_directory
from flashmesh.node.store_writer import pack
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.codec import encode_numpy, to_numpy
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import format_bytes, parse_bytes
from flashmesh.testing.swift_messages import message_vectors
from flashmesh.testing.swift_tls_vectors import tls_vectors
from flashmesh.testing.synthetic import build_model

XXH3_LENGTHS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 64, 100, 127, 128, 129, 200, 239, 240, 241, 255, 256]
XXH3_LENGTHS += [511, 1023, 1024, 1025, 2047, 4096, 16384, 65537, 1_048_579]
BUNDLES = {  # name -> (architecture, quantization, target)
    "qwen3_moe-fp16": ("qwen3_moe", None, "iOS18"),
    "deepseek_v3-fp16": ("deepseek_v3", None, "iOS18"),
    "qwen3_moe-q4-iOS18": ("qwen3_moe", {"bits": 4, "group_size": 64, "mode": "affine"}, "iOS18"),
    "qwen3_moe-q4-iOS26": ("qwen3_moe", {"bits": 4, "group_size": 64, "mode": "affine"}, "iOS26"),
}
TOKEN = "vector-token"


def export_bundles(out: Path) -> dict[str, Path]:
    """The BUNDLES exported from 3-layer random models under `out`."""
    models = out / "models"
    paths = {}
    for name, (arch, quant, target) in BUNDLES.items():
        key = f"{arch}-{'q4' if quant else 'fp32'}"
        store = models / f"{key}-store"
        if not store.exists():
            src = build_model(models / f"{key}-src", arch, quantize=quant, layers=3)
            pack(str(src), store, show_progress=False)
        paths[name] = out / f"{name}.flashmesh-ios"
        export_ios(store, paths[name], target=target, context=16, prefill=4, show_progress=False)
    shutil.rmtree(models)
    return paths


def _error(bundle: Path) -> str:
    try:
        BundleExpertSource(bundle).close()
    except UserError as e:
        return str(e)
    raise AssertionError(f"{bundle} was accepted")


def _refusals(bundle: Path, out: Path) -> list[dict]:
    """Copies of a bundle with an edited manifest, and the Python node's one-line refusal of each."""
    cases = []
    for what in ("format", "protocol", "edited"):
        copy = out / f"refused-{what}.flashmesh-ios"
        shutil.copytree(bundle, copy)
        manifest = load_manifest(copy)
        path = copy / "manifest.json"
        if what == "format":
            text = json.loads(path.read_text())
            text["bundle_format"] = 2
            path.write_text(json.dumps(text, indent=1))
        elif what == "protocol":
            manifest.pop("section_checksums")
            save_manifest(copy, {**manifest, "protocol_version": 2})  # checksums recomputed: only the version is wrong
        else:
            text = json.loads(path.read_text())
            text["config"]["hidden_size"] += 1  # section checksums left as they were
            path.write_text(json.dumps(text, indent=1))
        cases.append({"bundle": copy.name, "error": _error(copy).replace(str(copy), "{bundle}")})
    return cases


def _manifest(bundle: Path) -> dict:
    source = BundleExpertSource(bundle)
    try:
        m = source.manifest
        return {
            "bundle": bundle.name,
            "fingerprint": m.fingerprint,
            "hidden_size": int(m.config["hidden_size"]),
            "top_k": m.top_k,
            "model_type": m.config["model_type"],
            "min_budget_bytes": m.min_budget_bytes,
            "expert_bytes_total": m.expert_bytes_total,
            "layers": [
                {
                    "layer": s.layer, "num_experts": s.num_experts, "record_size": s.record_size,
                    "payload_bytes": s.payload_bytes, "experts": list(s.experts),
                    "ram": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in s.tensors],
                }
                for s in m.layers
            ],
        }  # fmt: skip
    finally:
        source.close()


def _records(bundle: Path, out: Path) -> list[dict]:
    """Records of the last layer converted the Python way: the iOS 18 kernel's fp16 inputs (CPU
    dequantization) and the node's RAM arrays (fp32 weights or scales, packed uint32 words)."""
    import mlx.core as mx

    source = BundleExpertSource(bundle)
    quant = source.bundle_manifest["quantization"]
    spec = source.layer(source.manifest.layers[-1].layer)
    vectors = []
    try:
        for e in spec.experts[:3]:
            raw = source.read_raw(spec.layer, e)
            arrays = source._arrays(mx.array(np.frombuffer(raw, np.uint8)), 0, source._specs[spec.layer])
            entry = {"bundle": bundle.name, "layer": spec.layer, "expert": e, "ram": {}}
            for name, a in arrays.items():
                file = f"{bundle.stem}-{spec.layer}-{e}-{name}.ram"
                (out / file).write_bytes(np.array(a).tobytes())
                entry["ram"][name] = file
            if quant["expert_input"] == "float16_cpu_dequant":
                kernel = stack_kernel_inputs([tensors_from_record(raw, source._specs[spec.layer])], quant)
                entry["kernel_fp16"] = {}
                for name, a in kernel.items():
                    file = f"{bundle.stem}-{spec.layer}-{e}-{name}.fp16"
                    (out / file).write_bytes(np.ascontiguousarray(a[0]).tobytes())
                    entry["kernel_fp16"][name] = file
            vectors.append(entry)
    finally:
        source.close()
    return vectors


def _pairs(bundle: Path, out: Path) -> list[dict]:
    """Per-(row, expert) outputs of the Python bundle node for requests over every layer."""
    source = BundleExpertSource(bundle)
    budget = source.manifest.expert_bytes_total
    source.close()
    service = NodeService(bundle, bundle=True, ram_budget=budget, token=TOKEN, flash_gbps=1.0)
    rng = np.random.default_rng(7)
    vectors = []
    try:
        for spec in service.manifest.layers:
            for dtype in ("float32", "bfloat16") if spec is service.manifest.layers[0] else ("float32",):
                m = 5
                x = rng.standard_normal((m, service.hidden_size)).astype(np.float32)
                pairs = m * service.top_k
                rows = np.repeat(np.arange(m, dtype=np.int32), service.top_k)
                experts = np.array(rng.choice(spec.experts, size=pairs), dtype=np.int32)
                xt = encode_numpy(x)
                if dtype == "bfloat16":
                    xt = pb.Tensor(dtype="bfloat16", shape=[m, service.hidden_size],
                                   data=(x.view(np.uint32) >> 16).astype(np.uint16).tobytes())  # fmt: skip
                req = pb.ComputeRequest(layer=spec.layer, x=xt, rows=encode_numpy(rows), experts=encode_numpy(experts))
                y = to_numpy(service.compute(req).y)
                name = f"{bundle.stem}-pairs-{spec.layer}-{dtype}"
                (out / f"{name}.request").write_bytes(req.SerializeToString())
                (out / f"{name}.y").write_bytes(np.ascontiguousarray(y, np.float32).tobytes())
                vectors.append({"bundle": bundle.name, "request": f"{name}.request", "y": f"{name}.y",
                                "pairs": int(pairs), "max_abs_y": float(np.abs(y).max())})  # fmt: skip
    finally:
        service.close()
    return vectors


def _cache_traces(bundle: Path) -> list[dict]:
    """Acquires (split into waves as the node does) and prefetches on routing with reuse, under the
    Python node's default policy, at budgets below one token's experts, above it, and holding all."""
    source = BundleExpertSource(bundle)
    m = source.manifest
    payload = m.layers[0].payload_bytes
    traces = []
    try:
        for slots in (m.top_k + 2, 3 * m.top_k * len(m.layers), sum(len(s.experts) for s in m.layers)):
            cache = ExpertCache(source, budget_bytes=slots * payload)  # the default policy
            rng = np.random.default_rng(slots)
            weights = 1.0 / np.arange(1, m.layers[0].num_experts + 1)  # skewed: some experts are reused often
            steps = []
            for step in range(60):
                spec = m.layers[step % len(m.layers)]
                if step % 7 == 3:
                    experts = [int(e) for e in rng.choice(spec.experts, size=m.top_k, replace=False)]
                    cache.prefetch(spec.layer, experts)
                    op = {"op": "prefetch", "layer": spec.layer, "experts": experts}
                else:
                    count = int(rng.integers(1, 2 * m.top_k + 1))
                    p = weights[: len(spec.experts)] / weights[: len(spec.experts)].sum()
                    experts = sorted({int(e) for e in rng.choice(spec.experts, size=count, p=p)})
                    for wave in cache.plan_waves(spec.layer, experts):
                        cache.acquire(spec.layer, wave)
                        cache.release(spec.layer, wave)
                    op = {"op": "acquire", "layer": spec.layer, "experts": experts}
                s = cache.stats
                op["after"] = {
                    "hits": s.hits, "misses": s.misses, "evictions": s.evictions, "bytes_read": s.bytes_read,
                    "prefetched": s.prefetched, "prefetch_used": s.prefetch_used, "prefetch_wasted": s.prefetch_wasted,
                    "bytes": cache.bytes, "resident": sorted([layer, e] for layer, e in cache._entries),
                }  # fmt: skip
                steps.append(op)
            cache.drain()
            traces.append({"bundle": bundle.name, "budget": slots * payload, "policy": cache.policy,
                           "effective_policy": cache.effective_policy, "steps": steps})  # fmt: skip
    finally:
        source.close()
    return traces


def _xxh3(out: Path) -> list[dict]:
    data = np.random.default_rng(3).integers(0, 256, max(XXH3_LENGTHS), dtype=np.uint8).tobytes()
    (out / "xxh3.bin").write_bytes(data)
    return [{"length": n, "hex": xxhash.xxh3_64_hexdigest(data[:n])} for n in XXH3_LENGTHS]


def _sizes() -> dict:
    counts = [0, 1, 512, 1023, 1024, 1536, 1048576, 5 * 1024**3 // 3, 3 * 1024**4 + 5]
    texts = ["2GB", "512MiB", "1.5g", "1048576", "10 MB", "3k", "1TiB"]
    return {"format": [[n, format_bytes(n)] for n in counts], "parse": [[t, parse_bytes(t)] for t in texts]}


def _advertisements() -> list[dict]:
    """The zeroconf advertisement `flashmesh node serve` registers, for names a phone or Mac may have."""
    names = ["iPhone", "Jürgen's iPhone 15 Pro", "mac-mini.local", "", "ノード 1", "x" * 60, "a_b c/d"]
    cases = []
    for i, name in enumerate(names):
        node_id, fp, port = f"{i:x}" * 12, f"{i + 7:x}" * 64, 50051 + i
        info = service_info(name=name, node_id=node_id, fingerprint=fp, port=port, interfaces=["127.0.0.1"])
        cases.append(
            {"name": name, "node_id": node_id, "fingerprint": fp, "port": port, "txt_hex": info.text.hex(),
             "instance": instance_name(name, node_id), "service": info.name}
        )  # fmt: skip
    return cases


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def write_vectors(out: Path, *, bundles: dict[str, Path] | None = None) -> Path:
    """Write the vectors to `out` (atomically), from `bundles` (name -> bundle, the names of BUNDLES; the
    tests pass the ones they exported already) or from bundles exported here. The vectors hold copies
    of the bundles without their Core ML programs, which the Swift node does not read."""
    out = Path(out)
    with staged_directory(out) as tmp:
        work = tmp / "exported"
        given = bundles or export_bundles(work)
        bundles = {}
        for name in BUNDLES:
            bundles[name] = tmp / f"{name}.flashmesh-ios"
            shutil.copytree(given[name], bundles[name], ignore=shutil.ignore_patterns("coreml"))
        shutil.rmtree(work, ignore_errors=True)
        index = {
            "xxh3": _xxh3(tmp),
            "sizes": _sizes(),
            "manifests": [_manifest(b) for b in bundles.values()],
            "refusals": _refusals(bundles["qwen3_moe-fp16"], tmp),
            "records": [
                r
                for name in ("qwen3_moe-q4-iOS18", "qwen3_moe-q4-iOS26", "qwen3_moe-fp16")
                for r in _records(bundles[name], tmp)
            ],  # fmt: skip
            "pairs": [p for b in bundles.values() for p in _pairs(b, tmp)],
            "messages": message_vectors(),
            "cache": _cache_traces(bundles["qwen3_moe-fp16"]),
            "advertisements": _advertisements(),
            "tls": tls_vectors(_mkdir(tmp / "tls")),
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
    return out


if __name__ == "__main__":
    print(write_vectors(Path(sys.argv[1] if len(sys.argv) > 1 else "mobile_export/ios/.build/vectors")))
