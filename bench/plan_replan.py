"""plan-validate's predictions from each round's own figures, for a routing source: the calibration
runs' curve, or the routing benchmark's (`python -m bench routing`: the engine's policy replayed on
1024 tokens of held-out text, bench/results/routing-*.json). Re-predicting needs no measuring:
`python -m bench plan-validate --replan bench/results/plan-validate.json`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from flashmesh.coordinator.hit_rate import Routing
from flashmesh.coordinator.model_facts import ModelFacts, load_facts
from flashmesh.coordinator.planner import Device, Plan, plan

RAM = 64 * 10**9  # not the limit here: every budget is given
ROUTING_BENCH = {
    "trained-tiny": Path("bench/results/routing-trained-demo.json"),
    "realistic-big": Path("bench/results/routing-realistic-big.json"),
}


def routing_bench_curve(path: Path) -> list[list[float]]:
    """[budget share, hit rate] of the engine's policy ("auto") in a routing benchmark's prompt phase."""
    points = json.loads(Path(path).read_text())["phases"]["prompt"]["policy_hit_rate_by_budget_share"]["auto"]
    return [[float(share), h] for share, h in sorted(points.items(), key=lambda kv: float(kv[0]))]


def devices_for(mode: str, figures: dict, *, budget: int) -> tuple[list[Device], Device | None]:
    """The plan's devices for a mode, from the figures taken just before the run."""
    if mode == "in-process":
        me = Device("this", RAM, figures["flash_gbps"], figures["compute_gbps"], budget_bytes=budget,
                    dense_compute_gbps=figures["dense_gbps"])  # fmt: skip
        return [me], None
    nodes = [
        Device(f"node{i}", RAM, figures["flash_gbps"], figures["compute_gbps"], budget_bytes=budget // 2, host="this",
               shared_compute_gbps=figures["shared_compute_gbps"], shared_flash_gbps=figures["shared_flash_gbps"])
        for i in range(2)
    ]  # fmt: skip
    head = Device("coordinator", RAM, figures["flash_gbps"], figures["compute_gbps"],
                  dense_compute_gbps=figures["dense_gbps"])  # fmt: skip
    return nodes, head


def predict(facts: ModelFacts, figures: dict, *, mode: str, budget: int, curve: list) -> Plan:
    devices, head = devices_for(mode, figures, budget=budget)
    points = [tuple(p) for p in sorted(curve)]
    points = ([(0.0, 0.0)] if points[0][0] > 0 else []) + points + ([(1.0, 1.0)] if points[-1][0] < 1 else [])
    return plan(facts, devices, coordinator=head, routing=Routing(curve=tuple(points)),
                link_ms=figures["link_ms"], layer_overhead_ms=figures["layer_overhead_ms"])  # fmt: skip


def add_predictions(result: dict, *, source: str, curves: dict[str, list], stores: dict[str, Path]) -> None:
    """row["predictions"][source]: per round and median, from the rounds' own figures."""
    facts = {m: load_facts(str(stores[m])) for m in curves}
    for row in result["rows"]:
        measured = [r["decode_tokens_per_s"] for r in row["rounds"]]
        plans = [predict(facts[row["model"]], r["figures"], mode=row["mode"], budget=row["budget_bytes"],
                         curve=curves[row["model"]]) for r in row["rounds"]]  # fmt: skip
        tps = [p.tokens_per_s for p in plans]
        row.setdefault("predictions", {})[source] = {
            "tokens_per_s": statistics.median(tps), "range": [min(tps), max(tps)],
            "error": statistics.median(tps) / statistics.median(measured) - 1,
            "round_errors": [p / m - 1 for p, m in zip(tps, measured, strict=True)],
            "hit_rate": plans[0].hit_rate,
            "seconds_per_token": [p.to_json()["seconds_per_token"] for p in plans],
        }  # fmt: skip
