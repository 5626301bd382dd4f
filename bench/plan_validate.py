"""Does `flashmesh plan` predict what runs here? Measure, predict, compare.

    python -m bench plan-validate [--workdir /work/data/ux/plan] [--tokens 24] [--rounds 2]

1. This machine's figures, measured apart from either model: compute (GB/s of fp32 expert weights
   mlx-lm's SwitchGLU multiplies for one token, MLX on the CPU, at a third shape), flash (the
   engine's O_DIRECT record reads at queue depth 8, bench/io.py) and the loopback request round trip to a node (Health).
2. Each model's routing: expert counts of one greedy generation of a calibration prompt (not the
   one measured), written as the planner's --routing file.
3. For each model, budget (all, half, a quarter of the experts) and mode (in-process; two local
   node processes), alternating rounds: the decode tok/s and hit rate of a second generation (the
   first warms the caches: the plan predicts steady state) beside the plan's.

Local nodes share this machine's CPU: the plan describes them as two devices with half its compute
each, plus a coordinator device for the dense part. Writes bench/results/plan-validate.json.
"""

from __future__ import annotations

import json
import logging
import secrets
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt
from flashmesh.coordinator.hit_rate import Routing
from flashmesh.coordinator.model_facts import load_facts
from flashmesh.coordinator.options import ModelOptions
from flashmesh.coordinator.planner import Device, plan
from flashmesh.coordinator.report import generate_report
from flashmesh.node.store_format import MANIFEST, Manifest
from flashmesh.node.store_writer import pack
from flashmesh.testing.synthetic import build_model

from bench.decode import PROMPT
from bench.engine import routing_trace

log = logging.getLogger(__name__)

CALIBRATION_PROMPT = "Hello, world! What is the capital of France? Paris. def main(): print('hello')"
MODELS = {
    "qwen3_moe-h1024-e64-k8": ("qwen3_moe", {"hidden": 1024, "layers": 4, "experts": 64, "top_k": 8,
                                             "expert_hidden": 512}),
    "mixtral-h1024-e16-k2": ("mixtral", {"hidden": 1024, "layers": 4, "experts": 16, "top_k": 2,
                                         "expert_hidden": 1024}),
}  # fmt: skip
FRACTIONS = (1.0, 0.5, 0.25)


def prepare(workdir: Path, name: str) -> Path:
    arch, shape = MODELS[name]
    source, store = workdir / f"{name}-src", workdir / f"{name}-store"
    if not (source / "config.json").is_file():
        build_model(source, arch, **shape)
    if not (store / MANIFEST).is_file():
        pack(str(source), store, force=True, show_progress=False)
    return store


def measure_compute_gbps(*, rounds: int = 7) -> float:
    """GB/s of fp32 expert weights mlx-lm's SwitchGLU multiplies for one token on this machine: a
    generic kernel (D=1536, F=768, 32 experts, k=6), not either model's shape."""
    from mlx_lm.models.switch_layers import SwitchGLU

    d, f, experts, k = 1536, 768, 32, 6
    glu = SwitchGLU(d, f, experts)
    mx.eval(glu.parameters())
    x = mx.random.normal((1, 1, d))
    picks = [mx.array(np.random.default_rng(i).choice(experts, k, replace=False)[None, None]) for i in range(rounds)]
    mx.eval(glu(x, picks[0]))
    times = []
    for idx in picks:
        start = time.perf_counter()
        mx.eval(glu(x, idx))
        times.append(time.perf_counter() - start)
    return k * 3 * d * f * 4 / statistics.median(times) / 1e9


def measure_flash_gbps(store: Path) -> float:
    from bench.io import run_io_bench

    return run_io_bench(store, queue_depths=(8,), seconds=1.0, rounds=3, verify=True)["engine_gbps_by_qd"]["8"]


def routing_file(store: Path, out: Path, *, tokens: int) -> Path:
    manifest = Manifest.load(store)
    counts = {s.layer: np.zeros(s.num_experts, dtype=np.int64) for s in manifest.layers}
    for layer, experts in routing_trace(store, max_tokens=tokens, prompt=CALIBRATION_PROMPT):
        counts[layer][experts] += 1
    out.write_text(json.dumps({"expert_counts": [counts[s.layer].tolist() for s in manifest.layers]}))
    return out


def measure(options: ModelOptions, *, tokens: int) -> dict:
    """Decode tok/s and hit rate of a second generation on an open model: the first warms the caches
    (the plan is steady state)."""
    streaming = open_model(options)
    try:
        prompt = encode_prompt(streaming.tokenizer, PROMPT, chat=False)
        params = SamplingParams(max_tokens=tokens)
        generate_report(streaming, prompt, params)
        report = generate_report(streaming, prompt, params)
    finally:
        streaming.close()
    return {"decode_tokens_per_s": report["decode_tokens_per_s"], "hit_rate": report["cache_hit_rate"]}


def measure_cluster(store: Path, workdir: Path, *, budget: int, tokens: int) -> dict:
    from flashmesh.coordinator.client import NodeClient
    from flashmesh.coordinator.cluster_view import _ping_ms
    from flashmesh.testing.local_nodes import ensure_shards, local_nodes

    shards = ensure_shards(store, workdir, count=2)
    token = secrets.token_urlsafe(12)
    with local_nodes(shards, budgets=[budget // 2] * 2, token=token, logdir=workdir / "logs") as nodes:
        client = NodeClient(nodes[0], token=token)
        try:
            ping = _ping_ms(client, tries=20)  # the link alone, before any layer is sent
        finally:
            client.close()
        got = measure(ModelOptions(store=store, cluster=True, nodes=tuple(nodes), token=token), tokens=tokens)
    return {**got, "ping_ms": ping}


def predict(store: Path, routing: Path, *, budget: int, mode: str, machine: dict) -> dict:
    facts = load_facts(str(store))
    compute, flash = machine["compute_gbps"], machine["flash_gbps"]
    ram = 64 * 10**9  # not the limit here: budgets are given
    if mode == "local":
        p = plan(facts, [Device("this", ram, flash, compute, budget_bytes=budget)], routing=Routing.load(routing))
    else:  # two nodes on this machine: each gets half its compute and shares its disk
        nodes = [Device(f"node{i}", ram, flash / 2, compute / 2, budget_bytes=budget // 2) for i in range(2)]
        p = plan(facts, nodes, routing=Routing.load(routing), link_ms=machine["link_ms"],
                 coordinator=Device("coordinator", ram, flash, compute))  # fmt: skip
    return {"tokens_per_s": p.tokens_per_s, "hit_rate": p.hit_rate}


def run_plan_validate(workdir: Path, *, tokens: int = 24, rounds: int = 2) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    stores = {name: prepare(workdir, name) for name in MODELS}
    first = next(iter(stores.values()))
    machine = {"compute_gbps": measure_compute_gbps(), "flash_gbps": measure_flash_gbps(first)}
    routings = {n: routing_file(s, workdir / f"{n}-routing.json", tokens=tokens) for n, s in stores.items()}
    rows: dict[tuple, dict] = {}
    for r in range(rounds):
        for name, store in stores.items():
            manifest = Manifest.load(store)
            for fraction in FRACTIONS:
                budget = max(int(manifest.expert_bytes_total * fraction), 2 * manifest.min_budget_bytes)
                for mode in ("local", "cluster"):
                    key = (name, fraction, mode)
                    log.warning("round %d: %s budget %.0f%% %s", r, name, fraction * 100, mode)
                    if mode == "local":
                        got = measure(ModelOptions(store=store, ram_budget=budget), tokens=tokens)
                    else:
                        got = measure_cluster(store, workdir, budget=budget, tokens=tokens)
                    row = rows.setdefault(key, {"model": name, "budget_fraction": fraction, "mode": mode,
                                                "budget_bytes": budget, "measured": []})  # fmt: skip
                    row["measured"].append(got)
    link = [m["ping_ms"] for row in rows.values() if row["mode"] == "cluster" for m in row["measured"]]
    machine["link_ms"] = statistics.median(link) if link else 1.0
    for (name, _, mode), row in rows.items():
        row["measured_tokens_per_s"] = statistics.median(m["decode_tokens_per_s"] for m in row["measured"])
        row["measured_hit_rate"] = statistics.median(m["hit_rate"] for m in row["measured"])
        pred = predict(stores[name], routings[name], budget=row["budget_bytes"], mode=mode, machine=machine)
        row["predicted_tokens_per_s"], row["predicted_hit_rate"] = pred["tokens_per_s"], pred["hit_rate"]
        row["error"] = row["predicted_tokens_per_s"] / row["measured_tokens_per_s"] - 1
    return {"machine": machine, "tokens": tokens, "rounds": rounds, "rows": list(rows.values())}
