"""Scaling: N local node processes, each in its own memory cgroup and with its read bandwidth capped
(cgroup v1 blkio throttle on the disk holding the store), each serving shard i of N; tok/s vs N.

Every node gets the same RAM budget and the same read cap, so N nodes have N caches and N times the
bandwidth of one: the reason to distribute a MoE by experts. All node counts run in one invocation,
in alternating rounds, so their ratios share the disk's and the CPU's moods. The coordinator (dense
part) runs in this process, outside the cgroups. Per node, the nodes' own statistics give the
profile: seconds waiting on reads vs seconds in expert compute.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from flashmesh.node.cache_stats import CacheStats
from flashmesh.node.store_format import MANIFEST, Manifest
from flashmesh.protos.errors import UserError

from bench.decode import PROMPT
from bench.oversub import CGROUP_ROOT, drop_page_cache, oom_kills
from bench.plots import save_plot

log = logging.getLogger(__name__)

BLKIO_ROOT = Path("/sys/fs/cgroup/blkio")


def disk_of(path: Path) -> str:
    """MAJ:MIN of the whole disk that holds `path` (blkio throttles whole disks, not partitions)."""
    dev = os.stat(path).st_dev
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    sys_dev = Path("/sys/dev/block") / majmin
    if not sys_dev.exists():
        raise UserError(f"{path} is on device {majmin}, which is not a block device; blkio cannot cap it")
    if (sys_dev / "partition").exists():
        majmin = (sys_dev.resolve().parent / "dev").read_text().strip()
    return majmin


class NodeCgroups:
    """One memory cgroup and one blkio cgroup per node; removed on close."""

    def __init__(self, name: str, *, memory_bytes: int, read_bps: int, disk: str):
        if not CGROUP_ROOT.is_dir() or not BLKIO_ROOT.is_dir():
            raise UserError("this benchmark needs the cgroup v1 memory and blkio controllers under /sys/fs/cgroup")
        self.memory = CGROUP_ROOT / name
        self.blkio = BLKIO_ROOT / name
        self.memory.mkdir(exist_ok=True)
        self.blkio.mkdir(exist_ok=True)
        (self.memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        (self.blkio / "blkio.throttle.read_bps_device").write_text(f"{disk} {read_bps}")
        self.disk = disk
        self.kills_before = oom_kills(self.memory)

    def join(self) -> Callable[[], None]:
        """A pre-exec hook: the calling (child) process joins both groups."""
        memory_procs, blkio_procs = self.memory / "cgroup.procs", self.blkio / "cgroup.procs"

        def hook() -> None:
            pid = str(os.getpid())
            memory_procs.write_text(pid)
            blkio_procs.write_text(pid)

        return hook

    def figures(self) -> dict:
        read = 0
        for line in (self.blkio / "blkio.throttle.io_service_bytes").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == self.disk and parts[1] == "Read":
                read = int(parts[2])
        return {
            "cgroup_read_bytes": read,
            "cgroup_max_usage_bytes": int((self.memory / "memory.max_usage_in_bytes").read_text()),
            "oom_killed": oom_kills(self.memory) > self.kills_before,
        }

    def close(self) -> None:
        for group in (self.memory, self.blkio):
            for _ in range(50):  # the node processes have exited; the kernel may lag a moment
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                log.warning("could not remove %s", group)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _node_delta(after, before) -> dict:
    used = CacheStats.from_proto(after).since(CacheStats.from_proto(before))
    return {
        "hits": used.hits,
        "misses": used.misses,
        "hit_rate": used.hit_rate,
        "bytes_read": used.bytes_read,
        "io_seconds": used.io_seconds,
        "compute_seconds": used.compute_seconds,
        "busy_seconds": after.busy_seconds - before.busy_seconds,
        "ram_budget_bytes": after.ram_budget_bytes,
        "peak_cache_bytes": after.peak_cache_bytes,
    }


def run_cluster_config(
    store: Path,
    dense: Path,
    shards: list[Path],
    *,
    ram_budget: int,
    memory_bytes: int,
    read_bps: int,
    disk: str,
    max_tokens: int,
    logdir: Path,
    lookahead: bool = False,
) -> dict:
    """Start len(shards) capped nodes, generate once, return tok/s and each node's profile."""
    from flashmesh.coordinator.engine import open_model
    from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
    from flashmesh.coordinator.options import ModelOptions
    from flashmesh.testing.local_nodes import local_nodes

    count = len(shards)
    tag = f"flashmesh-scale-{os.getpid()}-{secrets.token_hex(2)}"
    groups = [NodeCgroups(f"{tag}-{i}", memory_bytes=memory_bytes, read_bps=read_bps, disk=disk) for i in range(count)]
    token = secrets.token_urlsafe(18)
    try:
        drop_page_cache()
        with local_nodes(
            shards,
            budgets=[ram_budget] * count,
            token=token,
            logdir=logdir,
            before_exec=[g.join() for g in groups],
        ) as addresses:
            streaming = open_model(
                ModelOptions(store=dense, cluster=True, nodes=tuple(addresses), token=token, lookahead=lookahead)
            )
            nodes = streaming.nodes
            try:
                before = {n.node_id: n.client.stats() for n in nodes}
                prompt = encode_prompt(streaming.tokenizer, PROMPT, chat=False)
                first_at, at_first, calls_at_first = None, None, 0

                def on_token(count: int) -> None:
                    nonlocal first_at, at_first, calls_at_first
                    if count == 1:  # prefill done: node figures from here on are decode only
                        first_at = time.perf_counter()
                        at_first = {n.node_id: n.client.stats() for n in nodes}
                        calls_at_first = len(streaming.backend.dispatch.calls)

                start = time.perf_counter()
                params = SamplingParams(max_tokens=max_tokens)
                tokens = generate(streaming.model, streaming.tokenizer, prompt, params, on_token=on_token).tokens
                end = time.perf_counter()
                after = {n.node_id: n.client.stats() for n in nodes}
                # MoE layer calls made after the first token (split -> all replies in -> reassembled)
                dispatch_s = sum(c.seconds for c in streaming.backend.dispatch.calls[calls_at_first:])
                node_rows = [
                    {
                        "name": n.info.name,
                        "shard": int(n.info.name.rsplit("-", 1)[1]),  # local_nodes names node i "<run>-i"
                        **_node_delta(after[n.node_id], at_first[n.node_id]),
                        "prefill": _node_delta(at_first[n.node_id], before[n.node_id]),
                    }
                    for n in nodes
                ]
            finally:
                streaming.close()
        node_rows.sort(key=lambda r: r["shard"])
        for row in node_rows:
            row.update(groups[row["shard"]].figures())
    finally:
        for g in groups:
            g.close()
    decode_tokens = max(1, len(tokens) - 1)  # node figures after the first token: decode steps only
    return {
        "nodes": count,
        "tokens": tokens,
        "ttft_s": first_at - start,
        "decode_tokens_per_s": (len(tokens) - 1) / (end - first_at) if end > first_at else 0.0,
        "decode_s_per_token": (end - first_at) / decode_tokens,
        "bytes_read_per_token": sum(r["bytes_read"] for r in node_rows) / decode_tokens,
        "hit_rate": _ratio(sum(r["hits"] for r in node_rows), sum(r["hits"] + r["misses"] for r in node_rows)),
        "node_io_s_per_token_max": max(r["io_seconds"] for r in node_rows) / decode_tokens,
        "node_compute_s_per_token_sum": sum(r["compute_seconds"] for r in node_rows) / decode_tokens,
        "node_busy_s_per_token_max": max(r["busy_seconds"] for r in node_rows) / decode_tokens,
        # the coordinator waiting on the nodes; the rest of decode_s_per_token is its own dense part
        "dispatch_s_per_token": dispatch_s / decode_tokens,
        "coordinator_s_per_token": (end - first_at - dispatch_s) / decode_tokens,
        "per_node": node_rows,
    }


def run_scaling_bench(
    store: Path,
    *,
    counts: tuple[int, ...] = (1, 2, 4),
    ram_budget: int,
    read_bps: int,
    modes: tuple[str, ...] = ("same", "split"),
    memory_overhead: int = 768 * 2**20,
    max_tokens: int = 16,
    rounds: int = 1,
    lookahead: bool = False,
    workdir: Path = Path(".flashmesh/bench-scaling"),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Budget modes: "same" gives every node `ram_budget` (N nodes, N caches: what adding devices
    buys), "split" gives each node ram_budget / N (the RAM of one node spread over N: what the
    bandwidth alone buys). The first count is the baseline of both."""
    from flashmesh.node.shard import write_dense
    from flashmesh.testing.local_nodes import ensure_shards

    manifest = Manifest.load(store)
    disk = disk_of(store / manifest.layers[0].file)
    workdir = Path(workdir)
    dense = workdir / f"{store.name}-dense"
    if not (dense / MANIFEST).is_file() or Manifest.load(dense).fingerprint != manifest.fingerprint:
        write_dense(store, dense, force=True)
    shards = {n: [store] if n == 1 else ensure_shards(store, workdir, count=n) for n in counts}
    base = counts[0]
    configs = [(base, "same")] + [(n, m) for m in modes for n in counts if n != base]
    budgets = {(n, m): ram_budget * base // n if m == "split" else ram_budget for n, m in configs}
    for (n, m), b in budgets.items():
        if b < manifest.min_budget_bytes:
            raise UserError(f"{n} nodes ({m}) get {b} B each, below the minimum {manifest.min_budget_bytes} B")
    runs: dict[tuple[int, str], list[dict]] = {c: [] for c in configs}
    for i in range(rounds):
        for n, m in configs:
            if progress:
                progress(f"round {i + 1}/{rounds}: {n} node(s), {m} budget")
            runs[n, m].append(
                run_cluster_config(
                    store,
                    dense,
                    shards[n],
                    ram_budget=budgets[n, m],
                    memory_bytes=budgets[n, m] + memory_overhead,
                    read_bps=read_bps,
                    disk=disk,
                    max_tokens=max_tokens,
                    logdir=workdir / "logs",
                    lookahead=lookahead,
                )
            )
    rows = []
    baseline = runs[base, "same"]
    for n, m in configs:
        rs = runs[n, m]
        median = sorted(rs, key=lambda r: r["decode_tokens_per_s"])[(len(rs) - 1) // 2]
        ratios = [r["decode_tokens_per_s"] / baseline[k]["decode_tokens_per_s"] for k, r in enumerate(rs)]
        rows.append(
            {
                **median,
                "budget_mode": m,
                "ram_budget_per_node_bytes": budgets[n, m],
                "decode_tokens_per_s_all": [r["decode_tokens_per_s"] for r in rs],
                "speedup_by_round": ratios,
                "speedup": sorted(ratios)[(len(ratios) - 1) // 2],
                "tokens_match_1_node": all(r["tokens"] == baseline[0]["tokens"] for r in rs),
            }
        )
    return {
        "bench": "scaling",
        "store": str(store),
        "disk": disk,
        "expert_bytes_total": manifest.expert_bytes_total,
        "expert_payload_bytes": manifest.layers[0].payload_bytes,
        "ram_budget_bytes": ram_budget,
        "memory_overhead_per_node_bytes": memory_overhead,
        "read_bps_per_node": read_bps,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "lookahead": lookahead,
        "cpus": os.cpu_count(),
        "rows": rows,
    }


def plot_scaling(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    base = rows[0]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    counts = sorted({r["nodes"] for r in rows})
    for mode, label in (("same", "same budget per node"), ("split", "one node's budget split over N")):
        sel = [base] + [r for r in rows[1:] if r["budget_mode"] == mode]
        if len(sel) > 1:
            ax.plot([r["nodes"] for r in sel], [r["speedup"] for r in sel], "o-", label=label)
    ax.plot(counts, [c / counts[0] for c in counts], "--", color="gray", label="linear")
    ax.set_xlabel("nodes")
    ax.set_ylabel(f"decode tok/s / {counts[0]} node")
    ax.set_xticks(counts)
    ax.legend(fontsize=8)
    cap = result["read_bps_per_node"] / 1e6
    ax.set_title(f"read cap {cap:.0f} MB/s per node, budget {result['ram_budget_bytes'] / 2**20:.0f} MiB", fontsize=9)
    labels = [f"{r['nodes']}{'' if r is base else ' ' + r['budget_mode']}" for r in rows]
    x = range(len(rows))
    w = 0.2
    bars = [
        ("decode_s_per_token", "decode s/token"),
        ("node_busy_s_per_token_max", "busiest node: serving"),
        ("node_io_s_per_token_max", "slowest node: read wait"),
        ("node_compute_s_per_token_sum", "all nodes: expert compute"),
    ]
    for k, (key, label) in enumerate(bars):
        ax2.bar([i + (k - 1.5) * w for i in x], [r[key] for r in rows], w, label=label)
    ax2.set_xticks(list(x), labels, fontsize=8)
    ax2.set_ylabel("seconds per token")
    ax2.legend(fontsize=8)
    ax2.set_title("decode profile (from node stats)", fontsize=9)
    return save_plot(fig, path, dpi=100)
