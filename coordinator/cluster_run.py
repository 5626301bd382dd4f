"""Generation across nodes (`flashmesh run --cluster`, the demo), and local node processes for
the demo, tests and benchmarks.

Statistics: the cache figures of a cluster run are the sums over nodes of what each node's cache
did during this generation (deltas of the nodes' Stats), so `flashmesh run` and `run --cluster`
report the same keys; `nodes` adds one entry per node and `dispatch` the wire figures.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flashmesh.coordinator.discovery import NodeAddress
from flashmesh.node.store_format import Manifest
from flashmesh.node.tls import TlsIdentity
from flashmesh.protos import TOKEN_ENV
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)


def resolve_token(token: str | None) -> str:
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UserError(
            f"the cluster needs its token: pass --token or set {TOKEN_ENV} (each node prints it when it starts)"
        )
    return token


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if values else 0.0


def _delta(after: pb.NodeStats, before: pb.NodeStats, field: str):
    return getattr(after, field) - getattr(before, field)


def run_on_cluster(
    store: Path,
    addresses: list[NodeAddress],
    *,
    token: str,
    prompt: str,
    chat: bool,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 0.0,
    prefill_step_size: int = 512,
    lookahead: bool = False,
    rpc_deadline: float | None = None,
    on_text=None,
    tls: TlsIdentity | None = None,
) -> dict:
    """Generate with the dense part here and the experts on the nodes; return the run's JSON."""
    from flashmesh.coordinator.engine import open_cluster
    from flashmesh.coordinator.generate import encode_prompt, generate

    streaming, nodes = open_cluster(
        store, addresses, token=token, lookahead=lookahead, rpc_deadline=rpc_deadline, tls=tls
    )
    try:
        before = {n.node_id: n.client.stats(timeout=10.0) for n in nodes}
        tokens = encode_prompt(streaming.tokenizer, prompt, chat=chat)
        stats = generate(
            streaming.model,
            streaming.tokenizer,
            tokens,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            prefill_step_size=prefill_step_size,
            on_text=on_text,
        )
        after = {n.node_id: _stats_or(n, before[n.node_id]) for n in nodes}
    finally:
        streaming.close()
    backend = streaming.backend
    manifest: Manifest = streaming.manifest
    result = stats.to_json()
    d = {f: sum(_delta(after[i], before[i], f) for i in after) for f in ("hits", "misses", "bytes_read")}
    io = sum(_delta(after[i], before[i], "io_seconds") for i in after)
    result.update(
        cache_hit_rate=d["hits"] / (d["hits"] + d["misses"]) if d["hits"] + d["misses"] else 0.0,
        expert_bytes_read=d["bytes_read"],
        read_gbps=d["bytes_read"] / io / 1e9 if io else 0.0,
        io_seconds=io,
        compute_seconds=sum(_delta(after[i], before[i], "compute_seconds") for i in after),
        ram_budget_bytes=sum(s.ram_budget_bytes for s in after.values()),
        peak_cache_bytes=sum(s.peak_cache_bytes for s in after.values()),
        expert_bytes_total=manifest.expert_bytes_total,
        bytes_read_per_token=d["bytes_read"] / max(1, len(stats.tokens)),
    )
    n_tokens = max(1, len(stats.tokens))
    ds = backend.stats
    result["dispatch"] = {
        "moe_layer_calls": ds.layer_calls,
        "rpc_requests": ds.requests,
        "rpc_requests_per_token": ds.requests / n_tokens,
        "wire_bytes": ds.wire_bytes,
        "wire_bytes_per_token": ds.wire_bytes / n_tokens,
        "layer_dispatch_ms_mean": float(np.mean(ds.layer_seconds) * 1e3) if ds.layer_seconds else 0.0,
        "layer_dispatch_ms_p99": percentile_ms(ds.layer_seconds, 99),
    }
    result["dispatch"]["failovers"] = [asdict(f) for f in ds.failovers]
    result["dispatch"]["recoveries"] = list(ds.recoveries)
    result["dispatch"]["stall_ms_max"] = max(ds.stall_seconds, default=0.0) * 1e3
    result["nodes"] = []
    for n in nodes:
        a, b, traffic = after[n.node_id], before[n.node_id], ds.nodes[n.node_id]
        hits, misses = _delta(a, b, "hits"), _delta(a, b, "misses")
        result["nodes"].append(
            {
                "name": n.info.name,
                "address": n.address.target,
                "node_id": n.node_id,
                "experts_held": sum(len(h.experts) for h in n.info.layers),
                "experts_assigned": len(backend.placement.assigned(n.node_id)),
                "ram_budget_bytes": a.ram_budget_bytes,
                "peak_cache_bytes": a.peak_cache_bytes,
                "cache_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                "expert_bytes_read": _delta(a, b, "bytes_read"),
                "prefetched": _delta(a, b, "prefetched"),
                "prefetch_used": _delta(a, b, "prefetch_used"),
                "requests": traffic.requests,
                "pairs": traffic.pairs,
                "wire_bytes": traffic.bytes_sent + traffic.bytes_received,
                "rpc_ms_mean": float(np.mean(traffic.latencies) * 1e3) if traffic.latencies else 0.0,
                "rpc_ms_p99": percentile_ms(traffic.latencies, 99),
                "up": backend.membership.states[n.node_id].up,
                "failed_requests": traffic.failures,
            }
        )
    return result


def _stats_or(node, fallback: pb.NodeStats) -> pb.NodeStats:
    """A node's statistics, or `fallback` (no change) when it went away during the run."""
    try:
        return node.client.stats(timeout=2.0)
    except UserError as e:
        log.warning("no statistics from %s: %s", node.client.label, e)
        return fallback
