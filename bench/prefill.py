"""`python -m bench prefill STORE --source SRC`: a long prompt's prefill at a partial budget vs mlx-lm in RAM.

The engine (opened afresh each round, cold cache, at `--budget` of the expert bytes) and mlx-lm (its
own load, everything in RAM) prefill the same ~1,000-token prompt in mlx-lm's prefill chunks and
generate one token; the order flips every round and the figure is the median per-round ratio of
prefill tok/s (prompt tokens / time to first token). Every record the engine reads is logged with
the chunk it was read in, so "each expert is read at most once per chunk" is checked, not assumed;
the engine's seconds waiting on reads and the bytes read per chunk say what bounds it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from pathlib import Path

from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest

from bench.overlap import TEXT

log = logging.getLogger(__name__)


def _engine_prefill(store: Path, *, budget: int, prompt: list[int], step: int) -> dict:
    streaming = open_model(ModelOptions(store=store, ram_budget=budget))
    try:
        first_layer = min(s.layer for s in streaming.manifest.layers)
        chunk = [-1]
        reads: Counter = Counter()  # (chunk, layer, expert) -> times read
        compute, load = streaming.backend.compute, streaming.store.load

        def counting_compute(layer, x, indices):
            if layer == first_layer:
                chunk[0] += 1  # a new model call (a prefill chunk, or the first token's step) begins
            return compute(layer, x, indices)

        def counting_load(layer, slots, slab, *, urgent):
            reads.update((chunk[0], layer, e) for e in slots)
            return load(layer, slots, slab, urgent=urgent)

        streaming.backend.compute, streaming.store.load = counting_compute, counting_load
        result = generate(
            streaming.model, streaming.tokenizer, prompt, SamplingParams(max_tokens=1), prefill_step_size=step
        )
        stats = streaming.cache.stats
        return {
            "tokens": result.tokens,
            "ttft_s": result.ttft_s,
            "prefill_tokens_per_s": len(prompt) / result.ttft_s,
            "model_calls": chunk[0] + 1,  # prefill chunks, then the step that makes the first token
            "max_reads_of_an_expert_in_a_chunk": max(reads.values(), default=0),
            "records_read": sum(reads.values()),
            "bytes_read": stats.bytes_read,
            "io_wait_seconds": stats.io_seconds,
            "hit_rate": stats.hit_rate,
            "peak_cache_bytes": stats.peak_bytes,
        }
    finally:
        streaming.close()


def run_prefill_bench(
    store: Path, source: Path, *, fraction: float, prompt_tokens: int, rounds: int, step: int = 512
) -> dict:
    from mlx_lm import load

    manifest = Manifest.load(store)
    budget = max(int(manifest.expert_bytes_total * fraction), manifest.min_budget_bytes)
    model, tokenizer = load(str(source))
    prompt = tokenizer.encode(TEXT * (1 + prompt_tokens // 40))[:prompt_tokens]
    generate(model, tokenizer, prompt[:64], SamplingParams(max_tokens=1))  # warm-up
    pairs = []
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        out: dict = {}
        for which in order:
            if which == 0:
                out["ours"] = _engine_prefill(store, budget=budget, prompt=prompt, step=step)
            else:
                start = time.perf_counter()
                ref = generate(model, tokenizer, prompt, SamplingParams(max_tokens=1), prefill_step_size=step)
                out["ref"] = {"tokens": ref.tokens, "ttft_s": ref.ttft_s, "wall_s": time.perf_counter() - start}
        pairs.append((out["ours"], out["ref"]))
        log.info("round %d: %.2f s vs %.2f s", r, out["ours"]["ttft_s"], out["ref"]["ttft_s"])
    ratios = [f["ttft_s"] / o["ttft_s"] for o, f in pairs]
    ours = [o for o, _ in pairs]
    return {
        "bench": "prefill",
        "store": str(store),
        "budget_fraction": fraction,
        "ram_budget_bytes": budget,
        "prompt_tokens": len(prompt),
        "prefill_step_size": step,
        "rounds": rounds,
        "vs_mlx_lm": statistics.median(ratios),
        "ratio_by_round": ratios,
        "prefill_tokens_per_s": statistics.median(o["prefill_tokens_per_s"] for o in ours),
        "mlx_lm_prefill_tokens_per_s": statistics.median(len(prompt) / f["ttft_s"] for _, f in pairs),
        "io_wait_share_of_prefill": statistics.median(o["io_wait_seconds"] / o["ttft_s"] for o in ours),
        "bytes_read_per_model_call": statistics.median(o["bytes_read"] / o["model_calls"] for o in ours),
        "read_gbps_while_waiting": statistics.median(o["bytes_read"] / o["io_wait_seconds"] / 1e9 for o in ours),
        "max_reads_of_an_expert_in_a_chunk": max(o["max_reads_of_an_expert_in_a_chunk"] for o in ours),
        "tokens_match_mlx_lm": all(o["tokens"] == f["tokens"] for o, f in pairs),
        "runs": [{"ours": o, "mlx_lm": f} for o, f in pairs],
    }
