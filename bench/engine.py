"""Engine benchmarks: router lookahead and eviction policies, and the RAM-budget sweep.

Every configuration runs in the same process, one after another, and results are reported as
ratios to a baseline measured in the same run (lookahead off / LRU; mlx-lm fully in RAM).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest

from bench.decode import PROMPT, streamed_decode
from bench.plots import save_plot
from bench.policy import record_trace, simulate

log = logging.getLogger(__name__)


def routing_trace(store: Path, *, max_tokens: int, prompt: str = PROMPT) -> list[tuple[int, list[int]]]:
    """The (layer, experts) requests of one greedy generation with everything fitting."""
    manifest = Manifest.load(store)
    streaming = open_model(ModelOptions(store=store, ram_budget=manifest.expert_bytes_total))
    try:
        trace = record_trace(streaming.cache)
        tokens = encode_prompt(streaming.tokenizer, prompt, chat=False)
        generate(streaming.model, streaming.tokenizer, tokens, SamplingParams(max_tokens=max_tokens))
        return trace
    finally:
        streaming.close()


def run_prefetch_bench(store: Path, *, ram_budget: int, max_tokens: int, repeats: int = 2) -> dict:
    """Lookahead off/on x LRU/LFU/cyclic at one budget; plus policy hit rates replayed on the routing trace."""
    manifest = Manifest.load(store)
    configs = [(la, p) for p in ("lru", "lfu", "cyclic", "auto") for la in (False, True)]
    runs: dict[str, list[dict]] = {f"{'on' if la else 'off'}-{p}": [] for la, p in configs}
    for _ in range(repeats):  # interleaved so that every configuration sees the same disk moods
        for la, policy in configs:
            r = streamed_decode(store, ram_budget=ram_budget, max_tokens=max_tokens, lookahead=la, policy=policy)
            runs[f"{'on' if la else 'off'}-{policy}"].append(r)
    base = runs["off-lru"]
    reference_tokens = base[0]["tokens"]
    summary = {}
    for name, rs in runs.items():
        tps = sorted(r["decode_tokens_per_s"] for r in rs)[len(rs) // 2]
        base_tps = sorted(r["decode_tokens_per_s"] for r in base)[len(base) // 2]
        last = rs[-1]
        summary[name] = {
            "decode_tokens_per_s": tps,
            "speedup_vs_off_lru": tps / base_tps if base_tps else None,
            "hit_rate": last["hit_rate"],
            "prefetch_coverage": last["prefetch_coverage"],
            "wasted_per_useful": last["wasted_per_useful"],
            "bytes_read_per_token": last["bytes_read_per_token"],
            "io_wait_seconds": last["io_wait_seconds"],
            "compute_seconds": last["compute_seconds"],
            "peak_cache_bytes": max(r["peak_cache_bytes"] for r in rs),
            "tokens_equal_off_lru": all(r["tokens"] == reference_tokens for r in rs),
        }
    trace = routing_trace(store, max_tokens=max_tokens)
    payload = manifest.layers[0].payload_bytes
    total_experts = sum(len(s.experts) for s in manifest.layers)
    per_token = manifest.top_k * len(manifest.layers)
    fractions = (0.5, 0.9, 1.0, 1.25, 2.0, 4.0)  # of one token's experts
    policy_hits = {
        f"{f:g}": {
            p: round(simulate(trace, capacity=max(manifest.top_k, int(per_token * f)), policy=p), 4)
            for p in ("auto", "lru", "lfu", "cyclic")
        }
        for f in fractions
    }
    return {
        "bench": "prefetch",
        "store": str(store),
        "ram_budget_bytes": ram_budget,
        "expert_bytes_total": manifest.expert_bytes_total,
        "expert_payload_bytes": payload,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "configs": summary,
        "trace_requests": len(trace),
        "experts_per_token": per_token,
        "total_experts": total_experts,
        "policy_hit_rate_by_capacity_in_tokens": policy_hits,
    }


def mlx_lm_in_ram(source: Path, *, max_tokens: int, prompt: str = PROMPT) -> dict:
    """mlx-lm's own load + generation, everything in RAM: the reference for everything-fits."""
    from mlx_lm import load

    model, tokenizer = load(str(source))
    tokens = encode_prompt(tokenizer, prompt, chat=False)
    result = generate(model, tokenizer, tokens, SamplingParams(max_tokens=max_tokens))
    return {"tokens": result.tokens, "decode_tokens_per_s": result.decode_tokens_per_s}


def everything_fits_overhead(store: Path, source: Path, *, max_tokens: int, rounds: int = 5) -> dict:
    """Decode tok/s of the engine with every expert preloaded vs mlx-lm fully in RAM: both models
    in this process, generations alternated after a warm-up, median of the per-round ratios."""
    from mlx_lm import load

    manifest = Manifest.load(store)
    streaming = open_model(ModelOptions(store=store, ram_budget=manifest.expert_bytes_total, preload=True))
    try:
        model, tokenizer = load(str(source))
        ours_in = encode_prompt(streaming.tokenizer, PROMPT, chat=False)
        ref_in = encode_prompt(tokenizer, PROMPT, chat=False)
        generate(streaming.model, streaming.tokenizer, ours_in, SamplingParams(max_tokens=max_tokens))
        generate(model, tokenizer, ref_in, SamplingParams(max_tokens=max_tokens))
        ratios, same = [], True
        for _ in range(rounds):
            ours = generate(streaming.model, streaming.tokenizer, ours_in, SamplingParams(max_tokens=max_tokens))
            ref = generate(model, tokenizer, ref_in, SamplingParams(max_tokens=max_tokens))
            ratios.append(ours.decode_tokens_per_s / ref.decode_tokens_per_s)
            same = same and ours.tokens == ref.tokens
        return {
            "rounds": rounds,
            "ratio_by_round": ratios,
            "vs_mlx_lm_in_ram": sorted(ratios)[len(ratios) // 2],
            "tokens_match_mlx_lm": same,
            "misses_after_preload": streaming.cache.stats.misses,
        }
    finally:
        streaming.close()


def run_budget_sweep(
    store: Path, *, source: Path | None, max_tokens: int, points: int = 6, lookahead: bool = False
) -> dict:
    """tok/s and hit rate from the minimum budget to everything-fits; mlx-lm in RAM as reference."""
    manifest = Manifest.load(store)
    lo, hi = manifest.min_budget_bytes, manifest.expert_bytes_total
    budgets = sorted({int(lo + (hi - lo) * i / (points - 1)) for i in range(points)})
    reference = mlx_lm_in_ram(source, max_tokens=max_tokens) if source is not None else None
    rows = []
    for budget in budgets:
        start = time.perf_counter()
        r = streamed_decode(store, ram_budget=budget, max_tokens=max_tokens, lookahead=lookahead)
        rows.append(
            {
                "ram_budget_bytes": budget,
                "budget_fraction": budget / hi,
                "decode_tokens_per_s": r["decode_tokens_per_s"],
                "hit_rate": r["hit_rate"],
                "prefetch_coverage": r["prefetch_coverage"],
                "bytes_read_per_token": r["bytes_read_per_token"],
                "peak_cache_bytes": r["peak_cache_bytes"],
                "tokens_match_mlx_lm": reference is not None and r["tokens"] == reference["tokens"],
                "vs_mlx_lm_in_ram": r["decode_tokens_per_s"] / reference["decode_tokens_per_s"] if reference else None,
            }
        )
        log.info("budget %d: %.2f tok/s in %.1fs", budget, r["decode_tokens_per_s"], time.perf_counter() - start)
    if reference is not None:  # measured again at the end: the ratio uses the mean of both
        again = mlx_lm_in_ram(source, max_tokens=max_tokens)["decode_tokens_per_s"]
        ref_tps = (reference["decode_tokens_per_s"] + again) / 2
        for row in rows:
            row["vs_mlx_lm_in_ram"] = row["decode_tokens_per_s"] / ref_tps
    return {
        "bench": "sweep",
        "store": str(store),
        "lookahead": lookahead,
        "max_tokens": max_tokens,
        "expert_bytes_total": hi,
        "min_budget_bytes": lo,
        "mlx_lm_in_ram_tokens_per_s": ref_tps if reference else None,
        "rows": rows,
        "everything_fits": everything_fits_overhead(store, source, max_tokens=max_tokens) if source else None,
    }


def plot_sweep(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["budget_fraction"] * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["decode_tokens_per_s"] for r in rows], "o-", label="decode tok/s")
    if result["mlx_lm_in_ram_tokens_per_s"]:
        ax.axhline(result["mlx_lm_in_ram_tokens_per_s"], ls="--", color="gray", label="mlx-lm, all in RAM")
    ax.set_xlabel("RAM budget, % of expert bytes")
    ax.set_ylabel("decode tok/s")
    ax2 = ax.twinx()
    ax2.plot(x, [r["hit_rate"] * 100 for r in rows], "s:", color="C1", label="hit rate %")
    ax2.set_ylabel("cache hit rate %")
    ax2.set_ylim(0, 100)
    fig.legend(loc="center right", fontsize=8)
    ax.set_title(f"budget sweep: {Path(result['store']).name[:40]}", fontsize=9)
    return save_plot(fig, path, dpi=100)
