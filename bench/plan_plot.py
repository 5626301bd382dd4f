"""Predicted vs measured decode tok/s of `bench plan-validate`, one point per row, the rounds' spread as bars."""

from __future__ import annotations

from pathlib import Path

from bench.plots import save_plot


def plot_plan_validate(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    markers = {"in-process": "o", "local nodes": "s"}
    colors = {"trained-tiny": "tab:blue", "realistic-big": "tab:orange"}
    values = []
    for r in result["rows"]:
        x, y = r["measured_tokens_per_s"], r["predicted_tokens_per_s"]
        (xlo, xhi), (ylo, yhi) = r["measured_range"], r["predicted_range"]
        ax.errorbar(x, y, xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt=markers[r["mode"]],
                    color=colors.get(r["model"], "gray"), alpha=0.85, capsize=2)  # fmt: skip
        ax.annotate(f"{r['budget_fraction']:.0%}", (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
        calibrated = r["predictions"]["calibration"]["tokens_per_s"]
        ax.plot(x, calibrated, markers[r["mode"]], mfc="none", color=colors.get(r["model"], "gray"), alpha=0.6)
        values += [xlo, xhi, ylo, yhi, calibrated]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.75, hi * 0.75], [lo * 1.25, hi * 1.25], color="green", alpha=0.1, label="±25%")
    for model, color in colors.items():
        ax.plot([], [], "o", color=color, label=model)
    for mode, marker in markers.items():
        ax.plot([], [], marker, color="gray", label=mode)
    ax.plot([], [], "o", mfc="none", color="gray", label="routing from the calibration runs")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured decode tok/s (median)",
           ylabel="flashmesh plan's prediction, tok/s (median; routing bench curve)",
           title="plan vs measured on this VM (medians over rounds; bars: min-max)")  # fmt: skip
    ax.legend(fontsize=8, loc="upper left")
    return save_plot(fig, path, dpi=120)
