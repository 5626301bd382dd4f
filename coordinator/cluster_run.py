"""Generation across nodes (`flashmesh run --cluster`, the demo), and local node processes for
the demo, tests and benchmarks.

Statistics: the cache figures of a cluster run are the sums over nodes of what each node's cache
did during this generation (deltas of the nodes' Stats), so `flashmesh run` and `run --cluster`
report the same keys; `nodes` adds one entry per node and `dispatch` the wire figures.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from coordinator.discovery import NodeAddress, discover
from node.store_format import MANIFEST, Manifest, StoreError
from protos import TOKEN_ENV
from protos import flashmesh_pb2 as pb

log = logging.getLogger(__name__)


def resolve_token(token: str | None) -> str:
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise StoreError(
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
    on_text=None,
) -> dict:
    """Generate with the dense part here and the experts on the nodes; return the run's JSON."""
    from coordinator.engine import open_cluster
    from coordinator.generate import encode_prompt, generate

    streaming, nodes = open_cluster(store, addresses, token=token, lookahead=lookahead)
    try:
        before = {n.node_id: n.client.stats() for n in nodes}
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
        after = {n.node_id: n.client.stats() for n in nodes}
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
            }
        )
    return result


def ensure_shards(store: Path, workdir: Path, *, count: int) -> list[Path]:
    """Shards 0..count-1 of `store` under `workdir`, written once per store fingerprint."""
    from node.shard import write_shard

    fingerprint = Manifest.load(store).fingerprint
    paths = []
    for i in range(count):
        path = Path(workdir) / f"{Path(store).name}-shard{i}of{count}"
        if not (path / MANIFEST).is_file() or Manifest.load(path).fingerprint != fingerprint:
            write_shard(store, path, count=count, index=i, force=True)
        paths.append(path)
    return paths


@contextmanager
def local_nodes(
    shards: list[Path],
    *,
    budgets: list[int],
    token: str,
    logdir: Path,
    timeout: float = 120.0,
    before_exec: list[Callable[[], None]] | None = None,
) -> Iterator[list[NodeAddress]]:
    """Start one `flashmesh node serve` process per shard on 127.0.0.1, find them by zeroconf on
    127.0.0.1, yield their addresses; always stop the processes on exit. `before_exec[i]` runs in
    node i's process before it execs (the benchmarks put each node in its own cgroups there)."""
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    run_id = f"local{os.getpid()}x{secrets.token_hex(2)}"
    names = [f"{run_id}-{i}" for i in range(len(shards))]
    env = {**os.environ, TOKEN_ENV: token, "TRANSFORMERS_VERBOSITY": "error"}
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        hooks = before_exec or [None] * len(shards)
        for shard, budget, name, hook in zip(shards, budgets, names, hooks, strict=True):
            log_file = open(logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in finally
            logs.append(log_file)
            cmd = [sys.executable, "-m", "coordinator.cli", "node", "serve", str(shard), "--ram-budget", str(budget)]
            cmd += ["--port", "0", "--interfaces", "127.0.0.1", "--name", name, "--parent-pid", str(os.getpid())]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=hook))
        wanted = set(names)
        found: dict[str, NodeAddress] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(names):
            for proc, name in zip(procs, names, strict=True):
                if proc.poll() is not None:
                    tail = (logdir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    raise StoreError(f"local node {name} exited with status {proc.returncode}: {' '.join(tail)}")
            if time.monotonic() > deadline:
                raise StoreError(f"local nodes {sorted(wanted - set(found))} did not appear within {timeout:g} s")
            for node in discover(
                interfaces=["127.0.0.1"],
                timeout=2.0,
                expect=len(names) - len(found),
                accept=lambda n: n.name in wanted and n.name not in found,
            ):
                found[node.name] = node
        yield [found[name] for name in names]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log_file in logs:
            log_file.close()
