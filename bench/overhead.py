"""`python -m bench overhead STORE --source SRC`: the engine's decode against mlx-lm's, alternating.

For each configuration (a RAM budget as a fraction of the expert bytes, with or without --preload)
and each round, the engine is opened afresh on the store (as `flashmesh run` opens it: cold cache,
first token reads) and generates greedily, and mlx-lm (its own `load`, everything in RAM, loaded once)
generates the same prompt; the order of the two flips every round so that neither always runs
first. The figure is the median of the per-round ratios of decode tok/s (tokens after the first).

Engine cost per MoE layer: (a) the main thread's CPU seconds per decoded token (`time.thread_time`,
time asleep not counted) of the engine minus mlx-lm's, divided by the MoE layers; (b) the main
thread's CPU time (`time.thread_time`, which excludes time
asleep waiting on MLX or on reads) inside the expert backend's `compute` per call, split by path
(lazy: every expert of the layer resident for good; sync: the router's choice is read), next to
the CPU time of mlx-lm's own `SwitchGLU.__call__` on the reference model: what mlx-lm itself pays
to build the same layer's expert graph.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest

from bench.decode import PROMPT
from bench.plots import save_plot

log = logging.getLogger(__name__)


class CpuTimer:
    """Wraps a layer call (.., x, indices); sums the calling thread's CPU seconds over decode calls
    (one row of indices: one token), the steady state the per-layer cost is about."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.calls, self.seconds = fn, 0, 0.0

    def __call__(self, *args):
        if args[-1].size != args[-1].shape[-1]:  # a prefill chunk: not counted
            return self.fn(*args)
        start = time.thread_time()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.thread_time() - start
            self.calls += 1

    @property
    def us_per_call(self) -> float:
        return self.seconds / self.calls * 1e6 if self.calls else 0.0


def timed_generate(model, tokenizer, prompt: list[int], *, max_tokens: int) -> dict:
    """Greedy generation with mlx-lm's stream_generate: tokens, decode tok/s, and the main thread's CPU
    seconds per decoded token (`time.thread_time`: time asleep waiting on MLX or reads not counted)."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    tokens, first = [], None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
        tokens.append(int(response.token))
        if first is None:
            first = _clocks()
    wall, cpu, all_cpu = (now - then for now, then in zip(_clocks(), first, strict=True))
    decoded = max(1, len(tokens) - 1)
    return {
        "tokens": tokens,
        "decode_tokens_per_s": decoded / wall,
        "main_cpu_s_per_token": cpu / decoded,
        "process_cpu_s_per_token": all_cpu / decoded,  # every thread: MLX's, the readers', the main one
    }


def _clocks() -> tuple[float, float, float]:
    return time.perf_counter(), time.thread_time(), time.process_time()


def _engine_decode(
    store: Path, *, budget: int, preload: bool, huge_pages: bool, prompt: list[int], max_tokens: int
) -> dict:
    streaming = open_model(ModelOptions(store=store, ram_budget=budget, preload=preload, huge_pages=huge_pages))
    try:
        timer = CpuTimer(streaming.backend.compute)
        streaming.backend.compute = timer  # this instance only: the dispatch calls backend.compute
        result = timed_generate(streaming.model, streaming.tokenizer, prompt, max_tokens=max_tokens)
        stats = streaming.cache.stats
        return {
            **result,
            "hit_rate": stats.hit_rate,
            "bytes_read_per_token": stats.bytes_read / max(1, len(result["tokens"])),
            "peak_cache_bytes": stats.peak_bytes,
            "engine_cpu_us_per_layer_call": timer.us_per_call,
            "layer_calls": timer.calls,
        }
    finally:
        streaming.close()


def _reference_decode(model, tokenizer, prompt: list[int], *, max_tokens: int) -> dict:
    from mlx_lm.models import switch_layers

    cls = switch_layers.SwitchGLU
    original = cls.__call__
    timer = CpuTimer(original)
    cls.__call__ = lambda self, x, indices: timer(self, x, indices)
    try:
        result = timed_generate(model, tokenizer, prompt, max_tokens=max_tokens)
    finally:
        cls.__call__ = original
    return {**result, "switchglu_cpu_us_per_call": timer.us_per_call}


def run_overhead(
    store: Path,
    source: Path,
    *,
    configs: list[tuple[float, bool, bool]],
    rounds: int,
    max_tokens: int,
) -> dict:
    """configs: (budget as a fraction of the expert bytes, preload, huge pages), all measured in each round."""
    from mlx_lm import load

    manifest = Manifest.load(store)
    model, tokenizer = load(str(source))
    prompt = encode_prompt(tokenizer, PROMPT, chat=False)
    generate(model, tokenizer, prompt, SamplingParams(max_tokens=4))  # warm-up
    runs: dict[str, list[tuple[dict, dict]]] = {}
    for r in range(rounds):
        for fraction, preload, huge_pages in configs:
            name = f"budget{fraction:g}{'-preload' if preload else ''}{'' if huge_pages else '-4k'}"
            budget = max(int(manifest.expert_bytes_total * fraction), manifest.min_budget_bytes)
            engine = {"budget": budget, "preload": preload, "huge_pages": huge_pages}
            if r % 2 == 0:
                ours = _engine_decode(store, **engine, prompt=prompt, max_tokens=max_tokens)
                ref = _reference_decode(model, tokenizer, prompt, max_tokens=max_tokens)
            else:
                ref = _reference_decode(model, tokenizer, prompt, max_tokens=max_tokens)
                ours = _engine_decode(store, **engine, prompt=prompt, max_tokens=max_tokens)
            runs.setdefault(name, []).append((ours, ref))
            log.info(
                "round %d %s: %.2f vs %.2f tok/s", r, name, ours["decode_tokens_per_s"], ref["decode_tokens_per_s"]
            )
    summary = {}
    for (fraction, preload, huge_pages), (name, pairs) in zip(configs, runs.items(), strict=True):
        ratios = [o["decode_tokens_per_s"] / f["decode_tokens_per_s"] for o, f in pairs]
        summary[name] = {
            "budget_fraction": fraction,
            "preload": preload,
            "huge_pages": huge_pages,
            "vs_mlx_lm": statistics.median(ratios),
            "ratio_by_round": [round(x, 4) for x in ratios],
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "hit_rate": statistics.median(o["hit_rate"] for o, _ in pairs),
            "bytes_read_per_token": statistics.median(o["bytes_read_per_token"] for o, _ in pairs),
            "peak_cache_bytes": max(o["peak_cache_bytes"] for o, _ in pairs),
            "engine_cpu_us_per_layer_call": statistics.median(o["engine_cpu_us_per_layer_call"] for o, _ in pairs),
            "mlx_lm_switchglu_cpu_us_per_call": statistics.median(f["switchglu_cpu_us_per_call"] for _, f in pairs),
            # main-thread CPU per token beyond mlx-lm's, per MoE layer: what the engine adds
            "extra_main_cpu_us_per_layer": statistics.median(
                (o["main_cpu_s_per_token"] - f["main_cpu_s_per_token"]) / len(manifest.layers) * 1e6 for o, f in pairs
            ),
            "main_cpu_ms_per_token": statistics.median(o["main_cpu_s_per_token"] * 1e3 for o, _ in pairs),
            # all threads' CPU per token, mlx-lm's over ours: steadier than tok/s on a shared machine
            "process_cpu_ratio": statistics.median(
                f["process_cpu_s_per_token"] / o["process_cpu_s_per_token"] for o, f in pairs
            ),
            "mlx_lm_main_cpu_ms_per_token": statistics.median(f["main_cpu_s_per_token"] * 1e3 for _, f in pairs),
            "tokens_match_mlx_lm": all(o["tokens"] == f["tokens"] for o, f in pairs),
            "decode_tokens_per_s": statistics.median(o["decode_tokens_per_s"] for o, _ in pairs),
            "mlx_lm_decode_tokens_per_s": statistics.median(f["decode_tokens_per_s"] for _, f in pairs),
        }
    return {
        "bench": "overhead",
        "store": str(store),
        "source": str(source),
        "moe_layers": len(manifest.layers),
        "expert_bytes_total": manifest.expert_bytes_total,
        "quantization": manifest.quantization,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "configs": summary,
    }


def plot_overhead(results: list[tuple[str, dict]], path: Path) -> Path:
    """Bars per configuration: decode tok/s vs mlx-lm (median, with the rounds' range) and the CPU
    ratio, for each labelled result (e.g. before / after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results[0][1]["configs"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    width = 0.8 / len(results)
    for i, (label, result) in enumerate(results):
        configs = [result["configs"][n] for n in names]
        xs = [j + i * width for j in range(len(names))]
        medians = [c["vs_mlx_lm"] for c in configs]
        spread = [
            [m - c["ratio_min"] for m, c in zip(medians, configs, strict=True)],
            [c["ratio_max"] - m for m, c in zip(medians, configs, strict=True)],
        ]
        axes[0].bar(xs, medians, width, yerr=spread, capsize=3, label=label)
        axes[1].bar(xs, [c["process_cpu_ratio"] for c in configs], width, label=label)
    for ax, title in zip(
        axes, ("decode tok/s / mlx-lm (median, range)", "CPU s per token: mlx-lm / engine"), strict=True
    ):
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(results[0][1]['store']).name}: {results[0][1]['moe_layers']} MoE layers", fontsize=9)
    return save_plot(fig, path, dpi=100)
