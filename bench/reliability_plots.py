"""Plots of the reliability benchmarks, from their result files:

    .venv/bin/python -m bench.reliability_plots bench/results/failover.json bench/results/chaos-demo-k3.json

failover.json -> failover.png: the stall of the layer call a fault hit, per fault, deadline only
against hedged (median bar, every run a dot, log scale). chaos-*.json -> chaos-*.png: every
request's latency over the run with the faults shaded, and the server's RSS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.plots import save_plot

FAULT_LABELS = {
    "sigkill_between_calls": "SIGKILL\nbetween calls",
    "sigkill_in_flight": "SIGKILL\ncall in flight",
    "sigstop": "SIGSTOP",
    "link_down": "link down",
}
CHAOS_COLORS = {"sigkill_restart": "tab:red", "sigstop": "tab:orange", "link_down": "tab:blue",
                "damaged_record": "tab:purple"}  # fmt: skip


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_failover(result: dict, path: Path) -> Path:
    plt = _pyplot()
    faults = [f for f in FAULT_LABELS if any(r["fault"] == f for r in result["runs"])]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.38
    for j, (mode, color) in enumerate((("deadline_only", "tab:grey"), ("hedged", "tab:green"))):
        medians = [result["summary"][f"{f}/{mode}"]["stall_s_median"] * 1e3 for f in faults]
        xs = [i + (j - 0.5) * width for i in range(len(faults))]
        ax.bar(xs, medians, width, color=color, label=mode.replace("_", " "))
        for x, f in zip(xs, faults, strict=True):
            runs = [r["stall_s"] * 1e3 for r in result["runs"] if r["fault"] == f and r["mode"] == mode]
            ax.scatter([x] * len(runs), runs, s=10, c="black", zorder=3)
    ax.axhline(250, ls="--", c="tab:red", lw=1, label="target 250 ms")
    ax.set_yscale("log")
    ax.set_xticks(range(len(faults)), [FAULT_LABELS[f] for f in faults])
    ax.set_ylabel("stall of the layer call hit (ms)")
    shape = result.get("model", {})
    model = f"{shape.get('layers')} layers x {shape.get('experts')} experts, expert hidden {shape.get('expert_hidden')}"
    ax.set_title(
        f"failover stall, netns hosts, replicas 2, deadline {result['rpc_deadline_s']:g} s ({model})", fontsize=9
    )
    ax.legend(fontsize=8)
    return save_plot(fig, path, dpi=110)


def plot_chaos(result: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    hold, start = result.get("fault_seconds", 5.0), result.get("chaos_started_s", result["calm_seconds"])
    for event in result["faults"]:
        a.axvspan(start + event["at"], start + event["at"] + hold, color=CHAOS_COLORS[event["kind"]], alpha=0.25, lw=0)
    rows = result.get("requests", [])
    ok = [r for r in rows if r[2]]
    a.scatter([r[0] for r in ok], [r[1] for r in ok], s=4, c="black", label="request served")
    failed = [r for r in rows if not r[2]]
    if failed:
        a.scatter([r[0] for r in failed], [r[1] for r in failed], s=16, c="red", marker="x", label="failed")
    a.axhline(result["calm_latency_p99_s"], ls="--", c="grey", lw=1, label="fault-free p99")
    a.axvline(start, c="grey", lw=1)  # fault-free phase before, faults after
    from matplotlib.patches import Patch

    handles, _ = a.get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.25, label=k.replace("_", " ")) for k, c in CHAOS_COLORS.items()]
    a.set_ylabel("request latency (s)")
    counts = f"{result['served']} served, {result['failed']} failed, {result['greedy_differs']} differ"
    a.set_title(
        f"chaos soak: {result['clients']} clients, {result['seconds'] / 60:.0f} min of faults, {counts}", fontsize=9
    )
    a.legend(handles=handles, fontsize=7, ncol=3)
    t, rss = zip(*result["rss_samples"], strict=True)
    b.plot(t, [r / 2**20 for r in rss])
    b.set_ylabel("server RSS (MiB)")
    b.set_xlabel("time since the fault-free phase began (s)")
    return save_plot(fig, path, dpi=110)


def main(paths: list[str]) -> None:
    for name in paths:
        path = Path(name)
        result = json.loads(path.read_text())
        plot = plot_chaos if result.get("bench") == "chaos" else plot_failover
        print(f"wrote {plot(result, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main(sys.argv[1:])
