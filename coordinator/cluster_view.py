"""What `flashmesh cluster ls | inspect | top` show: one row of figures per node, as JSON or rich tables."""

from __future__ import annotations

import time

from flashmesh.coordinator.client import NodeClient, NodeError
from flashmesh.coordinator.cluster import identity_problem
from flashmesh.coordinator.discovery import NodeAddress
from flashmesh.coordinator.placement import LayerShape, NodeCapacity, place
from flashmesh.coordinator.tables import fitted_table
from flashmesh.node.cache_stats import CacheStats
from flashmesh.node.expert_source import reader_label
from flashmesh.protos import flashmesh_pb2 as pb
from flashmesh.protos.errors import UserError
from flashmesh.protos.sizes import format_bytes
from rich.console import Console
from rich.table import Table


def _ping_ms(client: NodeClient, *, tries: int = 3) -> float:
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        client.health(timeout=5.0)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def node_row(address: NodeAddress, client: NodeClient) -> dict:
    """Figures of one node; an unreachable node gives a row with `error` set."""
    row: dict = {"name": address.name, "address": address.target, "source": address.source}
    try:
        info = client.info(timeout=5.0)
        problem = identity_problem(address, info)
        if problem is not None:
            row["error"] = f"node {address.label} {problem}; not using it"
            return row
        stats = client.stats(timeout=5.0)
        row["rpc_latency_ms"] = _ping_ms(client)
    except NodeError as e:
        row["error"] = str(e)
        return row
    cache = CacheStats.from_proto(stats)
    row.update(
        name=info.name,
        node_id=info.node_id,
        fingerprint=info.fingerprint,
        protocol_version=info.protocol_version,
        model_type=info.model_type,
        experts_held=sum(len(h.experts) for h in info.layers),
        experts_total=sum(h.num_experts for h in info.layers),
        ram_budget_bytes=stats.ram_budget_bytes,
        cache_bytes=stats.cache_bytes,
        peak_cache_bytes=stats.peak_cache_bytes,
        cache_hit_rate=cache.hit_rate,
        expert_bytes_read=stats.bytes_read,
        read_gbps=cache.read_gbps,
        flash_read_gbps=info.flash_read_gbps,
        reader=info.flash_reader,
        requests=stats.requests,
        prefetched=stats.prefetched,
        prefetch_used=stats.prefetch_used,
        pairs=stats.pairs,
        rejected=stats.rejected,
        uptime_s=stats.uptime_seconds,
        layers=[{"layer": h.layer, "held": len(h.experts), "experts": h.num_experts} for h in info.layers],
    )
    row["_info"] = info
    return row


def add_assignment(rows: list[dict]) -> None:
    """experts_assigned per node: the placement a coordinator would build over the nodes of each model."""
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        if "_info" in row:
            by_model.setdefault(row["fingerprint"], []).append(row)
    for group in by_model.values():
        infos: list[pb.NodeInfo] = [r["_info"] for r in group]
        layers = [LayerShape(h.layer, h.num_experts, h.expert_bytes) for h in infos[0].layers]
        capacities = [NodeCapacity.of(i) for i in infos]
        try:
            placement = place(layers, capacities)
        except UserError as e:
            for row in group:
                row["experts_assigned"] = None
                row["placement_error"] = str(e)
            continue
        for row in group:
            assigned = placement.assigned(row["node_id"])
            row["experts_assigned"] = len(assigned)
            per_layer: dict[int, int] = {}
            for layer, _ in assigned:
                per_layer[layer] = per_layer.get(layer, 0) + 1
            for entry in row["layers"]:
                entry["assigned"] = per_layer.get(entry["layer"], 0)


def public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def nodes_table(rows: list[dict], *, title: str, rates: dict | None = None, console: Console | None = None) -> Table:
    headers = ["name", "address", "model", "ver", "experts held / assigned", "RAM budget", "hit rate", "bytes read",
               "read GB/s", "flash GB/s", "reads", "requests", "RPC ms"]  # fmt: skip
    if rates is not None:
        headers += ["req/s", "read MB/s"]
    cells = []
    for row in rows:
        if "error" in row:
            cells.append([row["name"] or "?", row["address"], "", "", "unreachable", *[""] * (len(headers) - 5)])
            continue
        assigned = "-" if row.get("experts_assigned") is None else str(row["experts_assigned"])
        cells.append(
            [row["name"], row["address"], f"{row['model_type']} {row['fingerprint'][:12]}",
             str(row["protocol_version"]), f"{row['experts_held']} / {assigned}", format_bytes(row["ram_budget_bytes"]),
             f"{row['cache_hit_rate']:.1%}", format_bytes(row["expert_bytes_read"]), f"{row['read_gbps']:.2f}",
             f"{row['flash_read_gbps']:.2f}", reader_label(row["reader"]), str(row["requests"]),
             f"{row['rpc_latency_ms']:.2f}"]
        )  # fmt: skip
        if rates is not None:
            r = rates.get(row.get("node_id"), (0.0, 0.0))
            cells[-1] += [f"{r[0]:.1f}", f"{r[1] / 1e6:.1f}"]
    models = sorted({f"{r['model_type']} {r['fingerprint'][:12]}" for r in rows if "error" not in r})
    errors = "\n".join(row["error"] for row in rows if "error" in row) or None
    table = fitted_table(
        headers, cells, keep={"name", "address", "experts held / assigned", "hit rate"}, stack=("name", "address"),
        drop_order=["ver", "model", "reads", "flash GB/s", "bytes read", "requests", "RAM budget", "read MB/s"],
        title=title, console=console, caption=errors,
    )  # fmt: skip
    if not any(c.header == "model" for c in table.columns) and models:
        table.title = f"{title} (model {', '.join(models)})"
    if errors:
        table.caption_style = "red"
    return table


def layers_table(row: dict) -> Table:
    table = Table(title=f"{row['name']} ({row['address']}) node {row['node_id']}")
    for c in ("layer", "experts held", "assigned", "experts in layer"):
        table.add_column(c, justify="right")
    for entry in row["layers"]:
        table.add_row(str(entry["layer"]), str(entry["held"]), str(entry.get("assigned", "-")), str(entry["experts"]))
    return table
