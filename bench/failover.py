"""Failover stall on network-namespace hosts: a node killed, stopped or cut off in the middle of a
generation, demo model, with hedged requests on and off (alternating rounds, same run).

    .venv/bin/python -m bench.failover [--repeats 5] [--rpc-deadline 3] [--out bench/results/failover.json]

Three `flashmesh node serve` processes, each in its own network namespace on a private bridge
(testing.netns; needs root), hold shards with 2 replicas of every expert; the coordinator is this
process, on the bridge. Faults -- SIGKILL between two layer calls (the next connect is refused),
SIGKILL while a request is in flight (stopped first, killed 0.3 s later: the connection resets
under the call), SIGSTOP (the node just stops answering), link down (`ip link set eth0 down` in
its namespace: packets vanish) -- hit the busiest node half-way through the third decode step of a
fresh coordinator. Reported per fault and mode: the stall (the whole layer call that failed over
or was hedged), detection (send -> failure seen, where one was), whether the tokens equal the
in-process run, and how long the cluster took to take the node back once it returned. The hedge
share (hedge requests / requests) of each mode's fault-free warm-up generation says what hedging
costs when nothing is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
from rich.progress import track

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from flashmesh.coordinator.engine import open_model  # noqa: E402
from flashmesh.coordinator.options import ModelOptions  # noqa: E402
from flashmesh.coordinator.remote import DEFAULT_RPC_DEADLINE  # noqa: E402
from flashmesh.node.store_format import Manifest  # noqa: E402
from flashmesh.protos.errors import UserError  # noqa: E402
from flashmesh.testing import netns  # noqa: E402
from flashmesh.testing.demo import DEMO_SHAPE, prepare_demo  # noqa: E402
from flashmesh.testing.faults import generate_with_faults, wait_taken_back  # noqa: E402
from flashmesh.testing.local_nodes import ensure_dense, ensure_shards, local_node_processes  # noqa: E402

from bench.cli import write_result  # noqa: E402
from bench.reliability_plots import plot_failover  # noqa: E402

PROMPT = "The experts live on flash and"
FAULTS = ("sigkill_between_calls", "sigkill_in_flight", "sigstop", "link_down")
MODES = ("deadline_only", "hedged")


def _generate(streaming, max_tokens: int, on_layer_call=None) -> list[int]:
    return generate_with_faults(streaming, PROMPT, max_tokens=max_tokens, on_layer_call=on_layer_call)


class Fault:
    """One fault of `kind` on node process `index` of `nodes` (on `hosts`), and its repair."""

    def __init__(self, kind: str, nodes, hosts, index: int) -> None:
        self.kind, self.nodes, self.hosts, self.index = kind, nodes, hosts, index
        self.proc = nodes.procs[index]
        self._timer = threading.Timer(0.3, self.proc.send_signal, args=(signal.SIGKILL,))

    def inject(self) -> None:
        if self.kind == "sigkill_between_calls":
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        elif self.kind == "sigkill_in_flight":
            self.proc.send_signal(signal.SIGSTOP)
            self._timer.start()
        elif self.kind == "sigstop":
            self.proc.send_signal(signal.SIGSTOP)
        else:
            self.hosts.link(self.index, up=False)

    def repair(self) -> None:
        """Undo the fault: continue, relink, or restart the node at its address."""
        if self.kind == "sigstop":
            self.proc.send_signal(signal.SIGCONT)
        elif self.kind == "link_down":
            self.hosts.link(self.index, up=True)
        else:
            if self._timer.is_alive() or self.kind == "sigkill_in_flight":
                self._timer.join()
            self.proc.wait()
            self.nodes.restart(self.index)


def _one(nodes, hosts, dense, *, fault: str, mode: str, reference: list[int], max_tokens: int, rpc_deadline: float):
    streaming = open_model(
        ModelOptions(store=dense, cluster=True, nodes=tuple(nodes.addresses), token=nodes.token,
                     rpc_deadline=rpc_deadline, hedge=mode == "hedged")
    )  # fmt: skip
    connected = streaming.nodes
    backend = streaming.backend
    moe_layers = len(streaming.manifest.layers)
    try:
        _generate(streaming, max_tokens)  # warm caches and the measured latencies
        _generate(streaming, max_tokens)
        healthy = backend.dispatch
        backend.reset_dispatch()
        placement = backend.placement
        victim_id = max(placement.node_ids, key=lambda n: len(placement.assigned(n)))
        target = next(n.address.target for n in connected if n.node_id == victim_id)
        index = [a.target for a in nodes.addresses].index(target)
        hurt = Fault(fault, nodes, hosts, index)
        at = moe_layers * 3 + moe_layers // 2  # prefill, two decode steps, half of the third
        try:
            tokens = _generate(streaming, max_tokens, on_layer_call=lambda n: hurt.inject() if n == at else None)
        finally:
            hurt.repair()
        stats = backend.dispatch
        decode = [c.seconds for c in healthy.calls if c.tokens == 1]
        stall = max(stats.stall_seconds, default=0.0)
        return {
            "fault": fault,
            "mode": mode,
            "failovers": [(f.kind, f.pairs) for f in stats.failovers],
            "hedges": len(stats.hedges),
            "detect_s": max((f.detect_seconds for f in stats.failovers), default=None),
            "stall_s": stall,
            "healthy_layer_call_ms_median": float(np.median(decode) * 1e3),
            "healthy_hedge_share": healthy.hedge_share,
            "healthy_requests": healthy.requests,
            "tokens_match_reference": tokens == reference,
            "taken_back_s": wait_taken_back(backend),
        }
    finally:
        streaming.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".flashmesh/bench-failover"))
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--rpc-deadline", type=float, default=DEFAULT_RPC_DEADLINE)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if (why := netns.available()) is not None:
        raise SystemExit(f"error: {why}; this benchmark runs its nodes on network-namespace hosts")
    faults = [f for f in args.faults.split(",") if f]
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
    plan = [(f, m) for _ in range(args.repeats) for f in faults for m in MODES]  # alternating rounds
    with netns.netns_hosts(3) as hosts, local_node_processes(
        shards, budgets=[manifest.expert_bytes_total] * 3, token="bench-failover", logdir=args.workdir / "logs",
        flash_gbps=1.0, hosts=hosts.hosts, browse_on=hosts.gateway,
    ) as nodes:  # fmt: skip
        for fault, mode in track(plan, description="faults"):
            rows.append(_one(nodes, hosts, dense, fault=fault, mode=mode, reference=reference,
                             max_tokens=args.max_tokens, rpc_deadline=args.rpc_deadline))  # fmt: skip
    summary = {f"{f}/{m}": _summary([r for r in rows if r["fault"] == f and r["mode"] == m]) for f in faults
               for m in MODES}  # fmt: skip
    path = write_result(
        "failover",
        {"model": DEMO_SHAPE, "hosts": "network namespaces", "rpc_deadline_s": args.rpc_deadline,
         "summary": summary, "runs": rows},
        out=args.out,
    )  # fmt: skip
    for key, s in summary.items():
        print(
            f"{key:36s} runs {s['runs']}  tokens identical {s['tokens_match_reference']}/{s['runs']}  "
            f"stall median {s['stall_s_median']:.3f} s max {s['stall_s_max']:.3f} s  "
            f"taken back {s['taken_back']}/{s['runs']} (median {s['taken_back_s_median']:.2f} s)  "
            f"hedge share when healthy {s['healthy_hedge_share']:.4f}"
        )
    print(f"wrote {path} and {plot_failover(json.loads(path.read_text()), path.with_suffix('.png'))}")


def _summary(mine: list[dict]) -> dict:
    if not mine:
        raise UserError("no runs")
    back = [r["taken_back_s"] for r in mine if r["taken_back_s"] is not None]
    return {
        "runs": len(mine),
        "tokens_match_reference": sum(r["tokens_match_reference"] for r in mine),
        "taken_back": len(back),
        "taken_back_s_median": float(np.median(back)) if back else float("nan"),
        "stall_s_median": float(np.median([r["stall_s"] for r in mine])),
        "stall_s_max": float(max(r["stall_s"] for r in mine)),
        "healthy_layer_call_ms_median": float(np.median([r["healthy_layer_call_ms_median"] for r in mine])),
        "healthy_hedge_share": sum(r["healthy_hedge_share"] * r["healthy_requests"] for r in mine)
        / max(1, sum(r["healthy_requests"] for r in mine)),
    }


if __name__ == "__main__":
    main()
