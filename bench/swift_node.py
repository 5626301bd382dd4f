"""The Swift node (`flashmesh-node`) against the Python node (`flashmesh node serve --bundle`) serving the same
bundle at the same RAM budget: decode tok/s of a one-node cluster (alternating rounds, medians, as a
ratio), node-side seconds per token, each node's record read rate against fio's at the record size
(O_DIRECT, 8 in flight), and each node's RSS.

    .venv/bin/python -m bench.swift_node [--work /work/data/swift/bench] [--rounds 5] [--budget-share 0.5]

The model is a random-weight qwen3_moe (hidden 512, 8 layers of 32 experts, top-4, expert hidden 512,
fp32 store -> fp16 bundle, 1.5 MiB records) built once under --work: random routing sends nearly every
token to the same experts, so the cache figures say little about real routing; the ratio of the two
nodes on the same work is what this measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from flashmesh.coordinator.client import NodeClient
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.mobile_export.exporter import export_ios
from flashmesh.node.bundle_source import BundleExpertSource
from flashmesh.node.shard import write_dense
from flashmesh.node.store_format import MANIFEST, Manifest
from flashmesh.node.store_writer import pack
from flashmesh.protos.errors import UserError
from flashmesh.testing.swift_node import MixedNodeProcesses, node_binary
from flashmesh.testing.synthetic import build_model

from bench.cli import write_result

SHAPE = {"hidden": 512, "layers": 8, "experts": 32, "top_k": 4, "expert_hidden": 512}
PROMPT = "The experts live on flash and stream into memory when the router picks them."
TOKEN = "bench-swift-token"


def prepare(work: Path) -> tuple[Path, Path]:
    """(bundle, dense part), built once (again when this flashmesh reads another store format)."""
    store, bundle, dense = work / "store", work / "model.flashmesh-ios", work / "dense"
    try:
        Manifest.load(dense)
    except UserError:
        shutil.rmtree(work / "src", ignore_errors=True)
        for path in (store, bundle, dense):
            shutil.rmtree(path, ignore_errors=True)
    if not (store / MANIFEST).is_file():
        src = build_model(work / "src", "qwen3_moe", **SHAPE)
        pack(str(src), store, show_progress=False)
    if not (bundle / MANIFEST).is_file():
        export_ios(store, bundle, context=256, prefill=16, force=True, show_progress=False)
    if not (dense / MANIFEST).is_file():
        write_dense(store, dense, force=True)
    return bundle, dense


def fio_gbps(path: Path, record: int, *, seconds: int = 5) -> float | None:
    """fio random reads of whole records, O_DIRECT, 8 in flight (libaio), in GB/s; None without fio."""
    cmd = ["fio", "--name=records", f"--filename={path}", "--rw=randread", f"--bs={record}", "--direct=1"]
    cmd += ["--ioengine=libaio", "--iodepth=8", f"--runtime={seconds}", "--time_based", "--output-format=json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return json.loads(out)["jobs"][0]["read"]["bw_bytes"] / 1e9


def read_rounds(bundle: Path, binary: Path, work: Path, *, rounds: int, budget: int, record: int) -> dict:
    """Each node's start-up read measurement (64 whole records, 8 in flight, O_DIRECT; what `NodeInfo.
    flash_read_gbps` reports), a fresh process per round, alternating with the other node and fio."""
    layer_file = bundle / "experts" / "layer_000.bin"
    rates: dict[str, list[float]] = {"swift": [], "python": [], "fio": []}
    for r in range(rounds):
        for kind in ("swift", "python") if r % 2 == 0 else ("python", "swift"):
            nodes = MixedNodeProcesses([bundle], kinds=[kind], binary=binary, budgets=[budget], token=TOKEN,
                                       logdir=work / "logs")  # fmt: skip
            try:
                nodes.start(0)
                (address,) = nodes.find(timeout=120)
                client = NodeClient(address, token=TOKEN)
                rates[kind].append(client.info().flash_read_gbps)
                client.close()
            finally:
                nodes.stop()
        fio = fio_gbps(layer_file, record, seconds=3)
        if fio is not None:
            rates["fio"].append(fio)
    return {k: statistics.median(v) if v else None for k, v in rates.items()} | {"rounds": rates}


def rss_bytes(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def decode_round(dense: Path, address, *, max_tokens: int) -> dict:
    streaming = open_model(ModelOptions(store=dense, cluster=True, nodes=(address,), token=TOKEN))
    client = NodeClient(address, token=TOKEN)
    try:
        before = client.stats()
        prompt = encode_prompt(streaming.tokenizer, PROMPT, chat=False)
        result = generate(streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=max_tokens))
        after = client.stats()
    finally:
        client.close()
        streaming.close()
    generated = len(result.tokens)
    return {
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "ttft_s": result.ttft_s,
        "tokens": result.tokens,
        "node_busy_s_per_token": (after.busy_seconds - before.busy_seconds) / max(1, generated),
        "hit_rate": (after.hits - before.hits) / max(1, after.hits - before.hits + after.misses - before.misses),
    }


def run(work: Path, *, rounds: int, max_tokens: int, budget_share: float) -> dict:
    binary = node_binary()
    if binary is None:
        raise SystemExit("no Swift toolchain: cannot build flashmesh-node")
    bundle, dense = prepare(work)
    source = BundleExpertSource(bundle)
    total, record = source.manifest.expert_bytes_total, source.manifest.layers[0].record_size
    source.close()
    budget = max(int(total * budget_share), source.manifest.min_budget_bytes)
    kinds = ["swift", "python"]
    nodes = MixedNodeProcesses([bundle, bundle], kinds=kinds, binary=binary, budgets=[budget] * 2, token=TOKEN,
                               logdir=work / "logs", flash_gbps=1.0)  # fmt: skip
    per_kind: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        reads = read_rounds(bundle, binary, work, rounds=rounds, budget=budget, record=record)
        for i in range(2):
            nodes.start(i)
        nodes.find(timeout=120)
        for r in range(rounds):  # alternate which node goes first
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                per_kind[kind].append(decode_round(dense, nodes.addresses[kinds.index(kind)], max_tokens=max_tokens))
        rss = {kind: rss_bytes(nodes.procs[i].pid) for i, kind in enumerate(kinds)}
    finally:
        nodes.stop()
    medians = {
        kind: {
            key: statistics.median(r[key] for r in runs)
            for key in ("decode_tokens_per_s", "ttft_s", "node_busy_s_per_token")
        }
        for kind, runs in per_kind.items()
    }
    return {
        "model": f"random qwen3_moe {SHAPE}, fp16 bundle",
        "record_bytes": record,
        "ram_budget_bytes": budget,
        "expert_bytes_total": total,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "tokens_equal": all(r["tokens"] == per_kind["python"][0]["tokens"] for runs in per_kind.values() for r in runs),
        "medians": medians,
        "decode_ratio_swift_over_python": medians["swift"]["decode_tokens_per_s"]
        / medians["python"]["decode_tokens_per_s"],
        "node_busy_ratio_swift_over_python": medians["swift"]["node_busy_s_per_token"]
        / medians["python"]["node_busy_s_per_token"],
        "decode_rounds": {k: [r["decode_tokens_per_s"] for r in v] for k, v in per_kind.items()},
        "ttft_ratio_swift_over_python": medians["swift"]["ttft_s"] / medians["python"]["ttft_s"],
        "hit_rate": {k: statistics.median(r["hit_rate"] for r in v) for k, v in per_kind.items()},
        "read_gbps": reads,
        "read_ratio_swift_over_fio": reads["swift"] / reads["fio"] if reads["fio"] else None,
        "read_ratio_python_over_fio": reads["python"] / reads["fio"] if reads["fio"] else None,
        "rss_bytes": rss,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/work/data/swift/bench"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--budget-share", type=float, default=0.5, help="RAM budget as a share of every expert's bytes")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = run(args.work, rounds=args.rounds, max_tokens=args.max_tokens, budget_share=args.budget_share)
    result["bench_seconds"] = time.perf_counter() - start
    path = write_result("swift-node", result)
    print(json.dumps(result, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
