"""The dashboard at `/`: nodes, placement, per-node hit rate, read GB/s and request latency, and decode
tok/s over the last minutes. One self-contained page (styles and script inline, nothing fetched from
elsewhere) that polls `/dashboard.json`, built here from the server's own figures: the worker's
model and nodes, each node's statistics, and ServerMetrics' recent generations and latencies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from flashmesh.coordinator.api.metrics import ServerMetrics
from flashmesh.coordinator.api.worker import GenerationWorker
from flashmesh.node.cache_stats import CacheStats

WINDOW_S = 600.0  # the tok/s chart's span
PAGE = (Path(__file__).parent / "dashboard.html").read_text()


def _local_node(worker: GenerationWorker) -> dict:
    """The in-process experts as one node row."""
    s = worker.streaming.cache.stats
    experts = sum(spec.num_experts for spec in worker.manifest.layers)
    return {
        "name": "this process", "address": "in-process", "up": True, "experts_held": experts,
        "experts_assigned": experts, "hit_rate": s.hit_rate if s.hits + s.misses else None,
        "read_gbps": s.read_gbps if s.io_seconds else None, "rpc_ms": None, "bytes_read": s.bytes_read,
    }  # fmt: skip


def _remote_nodes(worker: GenerationWorker, metrics: ServerMetrics) -> list[dict]:
    remote = worker.streaming.remote
    placement = remote.placement if remote is not None else None
    rows = []
    for n in worker.streaming.nodes:
        row = {"name": n.info.name, "address": n.address.target, "node_id": n.node_id,
               "experts_held": sum(len(h.experts) for h in n.info.layers),
               "experts_assigned": len(placement.assigned(n.node_id)) if placement else None}  # fmt: skip
        try:
            s = CacheStats.from_proto(n.client.stats(timeout=2.0))
        except Exception as e:  # noqa: BLE001 - an unreachable node is shown as down, not an error page
            rows.append({**row, "up": False, "error": str(e)})
            continue
        recent = metrics.node_latency_recent.get(n.client.label)
        row.update(up=True, hit_rate=s.hit_rate if s.hits + s.misses else None, bytes_read=s.bytes_read,
                   read_gbps=s.read_gbps if s.io_seconds else None,
                   rpc_ms=float(np.mean(recent)) * 1e3 if recent else None)  # fmt: skip
        rows.append(row)
    return rows


def _placement(worker: GenerationWorker) -> dict:
    """Experts per layer per node: {"nodes": [names], "layers": [[layer, count per node], ...]}."""
    remote = worker.streaming.remote
    if remote is None:
        return {"nodes": ["this process"], "layers": [[s.layer, s.num_experts] for s in worker.manifest.layers]}
    p = remote.placement
    names = {n.node_id: n.info.name for n in worker.streaming.nodes}
    return {
        "nodes": [names.get(i, i) for i in p.node_ids],
        "layers": [[layer, *np.bincount(row, minlength=len(p.node_ids)).tolist()] for layer, row in
                   sorted(p.owner.items())],
    }  # fmt: skip


def dashboard_state(worker: GenerationWorker, metrics: ServerMetrics, *, model_id: str) -> dict:
    now = time.time()
    cluster = worker.streaming.remote is not None
    nodes = _remote_nodes(worker, metrics) if cluster else [_local_node(worker)]
    return {
        "model": model_id, "mode": "cluster" if cluster else "in-process", "now": now,
        "uptime_s": now - worker.started_at, "queue_depth": worker.queue_depth, "nodes": nodes,
        "placement": _placement(worker),
        "tokens_per_s": [{"t": t, "tps": tps, "tokens": n} for t, tps, n in metrics.generations_recent
                         if now - t <= WINDOW_S],
        "window_s": WINDOW_S,
    }  # fmt: skip


def add_dashboard(app: FastAPI, worker: GenerationWorker, metrics: ServerMetrics, *, model_id: str) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/dashboard.json")
    async def state() -> dict:
        # node statistics are gRPC calls: off the event loop
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: dashboard_state(worker, metrics, model_id=model_id)
        )
