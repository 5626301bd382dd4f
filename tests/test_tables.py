"""Every table readable at 80 columns: nothing cut short, names and addresses whole."""

from __future__ import annotations

import io

from flashmesh.coordinator.cli import print_nodes, print_stats
from flashmesh.coordinator.cluster_view import layers_table, nodes_table
from flashmesh.coordinator.tables import fitted_table
from rich.console import Console

NAMES = ["local1234567xab12-0", "studio.lan", "mini-2"]
ADDRESSES = ["127.0.0.1:45678", "192.168.100.200:50051", "[fe80::1]:7"]


def render(build, width: int = 80) -> str:
    """Print what build(console) makes (a table, or nothing when it prints itself) at `width` columns."""
    console = Console(width=width, file=io.StringIO(), record=True)
    table = build(console)
    if table is not None:
        console.print(table)
    return console.export_text()


def assert_fits(text: str, width: int = 80) -> None:
    assert max(len(line) for line in text.splitlines()) <= width, text
    assert "…" not in text, text
    for word in NAMES + ADDRESSES:
        assert word in text, f"{word} cut short:\n{text}"


def node_row(i: int) -> dict:
    return {
        "name": NAMES[i], "address": ADDRESSES[i], "node_id": f"id{i}", "model_type": "qwen3_moe",
        "fingerprint": "0123456789abcdef" * 2, "protocol_version": 1, "experts_held": 128, "experts_assigned": 100,
        "ram_budget_bytes": 3 * 2**30, "cache_hit_rate": 0.5, "expert_bytes_read": 123456789, "read_gbps": 1.25,
        "flash_read_gbps": 3.5, "reader": ["aio", "threads", ""][i], "requests": 12345, "rpc_latency_ms": 0.42,
        "layers": [{"layer": 0, "held": 64, "experts": 128, "assigned": 60}],
    }  # fmt: skip


def test_cluster_tables_fit():
    rows = [node_row(i) for i in range(3)]
    assert_fits(render(lambda c: nodes_table(rows, title="flashmesh cluster: 3 nodes", console=c)))
    rates = {f"id{i}": (12.5, 3e8) for i in range(3)}
    assert_fits(render(lambda c: nodes_table(rows, title="flashmesh cluster top", rates=rates, console=c)))
    # A wide terminal shows every column, headers on one line, a row per node.
    wide = render(lambda c: nodes_table(rows, title="t", console=c), width=200)
    assert "flash GB/s" in wide and "qwen3_moe 0123456789ab" in wide and len(wide.splitlines()) == 8
    assert "AIO" in wide and "threads" in wide and "unknown" in wide  # "": a node from before the field
    narrow = render(lambda c: nodes_table(rows, title="t", console=c))
    assert "(model qwen3_moe 0123456789ab)" in narrow  # the dropped column's one value moves to the title
    text = render(lambda c: layers_table(rows[0]))
    assert NAMES[0] in text and ADDRESSES[0] in text


def test_unreachable_row_fits():
    rows = [node_row(0), {"name": NAMES[1], "address": ADDRESSES[1], "error": "node studio.lan: connection refused"}]
    text = render(lambda c: nodes_table(rows, title="t", console=c))
    assert "unreachable" in text and "connection refused" in text and NAMES[1] in text and ADDRESSES[1] in text


def test_run_tables_fit():
    node = {
        "experts_held": 64, "experts_assigned": 64, "ram_budget_bytes": 2**30, "peak_cache_bytes": 2**29,
        "cache_hit_rate": 0.75, "expert_bytes_read": 10**9, "requests": 4321, "rpc_ms_mean": 1.5, "rpc_ms_p99": 12.25,
        "reader": "aio",
    }  # fmt: skip
    result = {
        "nodes": [{**node, "name": n, "address": a} for n, a in zip(NAMES, ADDRESSES, strict=True)],
        "dispatch": {"rpc_requests_per_token": 24.0, "wire_bytes_per_token": 123456, "layer_dispatch_ms_mean": 1.0,
                     "layer_dispatch_ms_p99": 2.0},
    }  # fmt: skip
    assert_fits(render(lambda c: print_nodes(result, console=c)))
    assert "AIO" in render(lambda c: print_nodes(result, console=c), width=200)
    stats = {
        "ttft_s": 0.5, "decode_tokens_per_s": 12.3, "cache_hit_rate": 0.5, "expert_bytes_read": 10**10,
        "bytes_read_per_token": 10**7, "read_gbps": 2.5, "io_seconds": 12.5, "compute_seconds": 30.25,
        "ram_budget_bytes": 4 * 2**30, "peak_cache_bytes": 4 * 2**30, "expert_bytes_total": 60 * 2**30,
        "tokens_match_reference": True, "reader": "aio", "cache_huge_page_bytes": 3 * 2**30,
        "flash_busy_seconds": 4.0, "flash_busy_share": 0.25,
    }  # fmt: skip
    text = render(lambda c: print_stats(stats, title="flashmesh run /some/store/path", console=c))
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "12.500 / 30.250" in text and "4GiB / 4GiB" in text and "AIO" in text and "3GiB" in text
    assert "4.000 s (25% of the run) at 2.50 GB/s" in text


def test_fitted_table_folds_what_cannot_fit():
    path = "/very/long/path/" * 8
    text = render(lambda c: fitted_table(["name", "source"], [["m", path]], keep={"name", "source"}, console=c))
    assert max(len(line) for line in text.splitlines()) <= 80
    folded = [line.rstrip("│ ").rsplit("│ ", 1)[1] for line in text.splitlines() if "very" in line or "path" in line]
    assert len(folded) > 1 and "".join(folded) == path
