"""Failover stall on loopback: a node killed or stopped in the middle of a generation, demo model.

    .venv/bin/python -m bench.failover [--repeats 5] [--rpc-deadline 3] [--out bench/results/failover.json]

Three local node processes hold shards with 2 replicas of every expert. For each fault -- SIGKILL
between two layer calls (the next connect is refused), SIGKILL while a request is in flight (the
node is stopped first, killed 0.3 s later: the connection resets under the call), SIGSTOP (only
the deadline can tell) -- a fresh coordinator generates --max-tokens tokens and the fault hits the
busiest node half-way through the third decode step. Reported per fault: detection time (request
sent -> failure seen), the stall (the whole layer call that failed over), the stall as a multiple
of the median healthy layer call of the same run, and whether the tokens equal the in-process run.
After each repeat the node is restarted (or continued) and must be taken back by the cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from rich.progress import track

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from flashmesh.coordinator.engine import open_model  # noqa: E402
from flashmesh.coordinator.options import ModelOptions  # noqa: E402
from flashmesh.coordinator.remote import DEFAULT_RPC_DEADLINE  # noqa: E402
from flashmesh.node.store_format import Manifest  # noqa: E402
from flashmesh.testing.demo import DEMO_SHAPE, prepare_demo  # noqa: E402
from flashmesh.testing.faults import generate_with_faults  # noqa: E402
from flashmesh.testing.local_nodes import ensure_dense, ensure_shards, local_node_processes  # noqa: E402

from bench.cli import write_result  # noqa: E402

PROMPT = "The experts live on flash and"
FAULTS = ("sigkill_between_calls", "sigkill_in_flight", "sigstop")


def _generate(streaming, max_tokens: int, on_layer_call=None) -> list[int]:
    return generate_with_faults(streaming, PROMPT, max_tokens=max_tokens, on_layer_call=on_layer_call)


def _one(nodes, dense, *, fault: str, reference: list[int], max_tokens: int, rpc_deadline: float, moe_layers: int):
    streaming = open_model(
        ModelOptions(
            store=dense, cluster=True, nodes=tuple(nodes.addresses), token=nodes.token, rpc_deadline=rpc_deadline
        )
    )
    connected = streaming.nodes
    backend = streaming.backend
    try:
        _generate(streaming, max_tokens)  # warm caches and the measured latency
        backend.reset_dispatch()
        placement = backend.placement
        victim_id = max(placement.node_ids, key=lambda n: len(placement.assigned(n)))
        target = next(n.address.target for n in connected if n.node_id == victim_id)
        index = [a.target for a in nodes.addresses].index(target)
        proc = nodes.procs[index]
        timer = threading.Timer(0.3, proc.send_signal, args=(signal.SIGKILL,))
        at = moe_layers * 3 + moe_layers // 2  # prefill, two decode steps, half of the third

        def hurt(n):
            if n != at:
                return
            if fault == "sigkill_between_calls":
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            else:
                proc.send_signal(signal.SIGSTOP)
                if fault == "sigkill_in_flight":
                    timer.start()

        try:
            tokens = _generate(streaming, max_tokens, on_layer_call=hurt)
        finally:
            if fault == "sigstop":
                proc.send_signal(signal.SIGCONT)
            elif timer.is_alive() or fault == "sigkill_in_flight":
                timer.join()
        stats = backend.dispatch
        healthy = [c.seconds for c in stats.calls if c.rounds == 1 and c.tokens == 1]
        stall = max(stats.stall_seconds, default=0.0)
        row = {
            "fault": fault,
            "failovers": [(f.kind, f.pairs) for f in stats.failovers],
            "detect_s": max((f.detect_seconds for f in stats.failovers), default=0.0),
            "stall_s": stall,
            "healthy_layer_call_ms_median": float(np.median(healthy) * 1e3),
            "stall_in_healthy_layer_calls": stall / float(np.median(healthy)),
            "tokens_match_reference": tokens == reference,
        }
        if fault != "sigstop":
            proc.wait()
            nodes.restart(index)
        time.sleep(0.6)  # past the probe back-off: the next layer call probes and takes it back
        row["taken_back"] = _generate(streaming, 2) == reference[:2] and backend.membership.down() == []
        return row
    finally:
        streaming.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".flashmesh/bench-failover"))
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rpc-deadline", type=float, default=DEFAULT_RPC_DEADLINE)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    store, _ = prepare_demo(args.workdir, show_progress=False)
    manifest = Manifest.load(store)
    local = open_model(ModelOptions(store=store, ram_budget=manifest.expert_bytes_total))
    try:
        reference = _generate(local, args.max_tokens)
    finally:
        local.close()
    dense = ensure_dense(store, args.workdir / "dense")
    shards = ensure_shards(store, args.workdir, count=3, replicas=2)
    rows = []
    with local_node_processes(
        shards,
        budgets=[manifest.expert_bytes_total] * 3,
        token="bench-failover",
        logdir=args.workdir / "logs",
        flash_gbps=1.0,
    ) as nodes:
        for fault, _ in track([(f, r) for f in FAULTS for r in range(args.repeats)], description="faults"):
            rows.append(
                _one(
                    nodes,
                    dense,
                    fault=fault,
                    reference=reference,
                    max_tokens=args.max_tokens,
                    rpc_deadline=args.rpc_deadline,
                    moe_layers=len(manifest.layers),
                )
            )
    summary = {}
    for fault in FAULTS:
        mine = [r for r in rows if r["fault"] == fault]
        summary[fault] = {
            "runs": len(mine),
            "tokens_match_reference": sum(r["tokens_match_reference"] for r in mine),
            "taken_back": sum(r["taken_back"] for r in mine),
            "detect_s_median": float(np.median([r["detect_s"] for r in mine])),
            "stall_s_median": float(np.median([r["stall_s"] for r in mine])),
            "stall_s_max": float(max(r["stall_s"] for r in mine)),
            "stall_in_healthy_layer_calls_median": float(np.median([r["stall_in_healthy_layer_calls"] for r in mine])),
        }
    path = write_result(
        "failover",
        {"model": DEMO_SHAPE, "rpc_deadline_s": args.rpc_deadline, "summary": summary, "runs": rows},
        out=args.out,
    )
    for fault, s in summary.items():
        print(
            f"{fault:24s} runs {s['runs']}  tokens identical {s['tokens_match_reference']}  "
            f"detect {s['detect_s_median']:.3f} s  stall median {s['stall_s_median']:.3f} s "
            f"max {s['stall_s_max']:.3f} s  ({s['stall_in_healthy_layer_calls_median']:.0f} healthy layer calls)"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
