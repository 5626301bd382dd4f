"""The one statistics assembly: what a generation did, and what the expert caches behind it did in
the same window, with the same keys wherever the experts ran (`flashmesh run`, `run --cluster`, the
demo, the benchmarks; `serve` sends the same cache deltas to /metrics). On nodes, the cache figures
are the sums over the nodes' caches; `nodes` adds one entry per node and `dispatch` the wire figures.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from flashmesh.coordinator.engine import StreamingModel, open_model
from flashmesh.coordinator.generate import GenerationStats, OnText, SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.cache_stats import ExpertStats


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if values else 0.0


def mean_ms(values: list[float]) -> float:
    return float(np.mean(values) * 1e3) if values else 0.0


def run_report(streaming: StreamingModel, generation: GenerationStats, before: ExpertStats, after: ExpertStats) -> dict:
    """The run's JSON: the generation, and the caches' work between `before` and `after`."""
    used = after.since(before)
    cache = used.total
    result = asdict(generation)
    result.update(
        cache_hit_rate=cache.hit_rate,
        expert_bytes_read=cache.bytes_read,
        read_gbps=cache.read_gbps,
        io_seconds=cache.io_seconds,
        compute_seconds=cache.compute_seconds,
        ram_budget_bytes=after.ram_budget_bytes,
        peak_cache_bytes=cache.peak_bytes,
        expert_bytes_total=streaming.manifest.expert_bytes_total,
        bytes_read_per_token=cache.bytes_read / max(1, len(generation.tokens)),
        lookahead=streaming.lookahead,
        prefetch_used=cache.prefetch_used,
    )
    if streaming.cache is not None:
        result["cache_huge_page_bytes"] = streaming.cache.huge_page_bytes()  # of ram_budget_bytes
        # how long reads were in flight, overlapping ones once: near the run's time means flash-bound
        result["flash_busy_seconds"] = cache.flash_busy_seconds
        rate = generation.decode_tokens_per_s
        run_seconds = generation.ttft_s + ((len(generation.tokens) - 1) / rate if rate else 0.0)
        result["flash_busy_share"] = cache.flash_busy_seconds / max(1e-9, run_seconds)
    if streaming.store is not None:
        result["page_cache_bypassed"] = streaming.store.bypassing_cache
        result["reader"] = streaming.store.reader  # "aio" (Linux AIO, O_DIRECT) or "threads"
    if streaming.remote is not None:
        result.update(_cluster_figures(streaming, used, n_tokens=max(1, len(generation.tokens))))
    return result


def _cluster_figures(streaming: StreamingModel, used: ExpertStats, *, n_tokens: int) -> dict:
    backend = streaming.remote
    ds = backend.dispatch
    dispatch = {
        "moe_layer_calls": ds.layer_calls,
        "rpc_requests": ds.requests,
        "rpc_requests_per_token": ds.requests / n_tokens,
        "wire_bytes": ds.wire_bytes,
        "wire_bytes_per_token": ds.wire_bytes / n_tokens,
        "layer_dispatch_ms_mean": mean_ms(ds.layer_seconds),
        "layer_dispatch_ms_p99": percentile_ms(ds.layer_seconds, 99),
        "failovers": [asdict(f) for f in ds.failovers],
        "recoveries": list(ds.recoveries),
        "hedges": [asdict(h) for h in ds.hedges],  # late requests whose pairs went to replicas too
        "hedge_share": ds.hedge_share,
        "stall_ms_max": max(ds.stall_seconds, default=0.0) * 1e3,
    }
    nodes = []
    for n in streaming.nodes:
        cache, traffic = used.caches[n.node_id], ds.nodes[n.node_id]
        nodes.append(
            {
                "name": n.info.name,
                "address": n.address.target,
                "node_id": n.node_id,
                "experts_held": sum(len(h.experts) for h in n.info.layers),
                "experts_assigned": len(backend.placement.assigned(n.node_id)),
                "ram_budget_bytes": used.budgets[n.node_id],
                "peak_cache_bytes": cache.peak_bytes,
                "cache_hit_rate": cache.hit_rate,
                "expert_bytes_read": cache.bytes_read,
                "reader": n.info.flash_reader,  # "aio", "threads"; "" from a node that does not say
                "prefetched": cache.prefetched,
                "prefetch_used": cache.prefetch_used,
                "requests": traffic.requests,
                "pairs": traffic.pairs,
                "wire_bytes": traffic.bytes_sent + traffic.bytes_received,
                "rpc_ms_mean": mean_ms(traffic.latencies),
                "rpc_ms_p99": percentile_ms(traffic.latencies, 99),
                "up": backend.membership.states[n.node_id].up,
                "failed_requests": traffic.failures,
            }
        )
    return {"dispatch": dispatch, "nodes": nodes}


def generate_report(
    streaming: StreamingModel,
    prompt_tokens: list[int],
    params: SamplingParams,
    *,
    prefill_step_size: int = 512,
    on_text: OnText | None = None,
) -> dict:
    """Generate on an open model and report it (`run_report`)."""
    before = streaming.backend.stats()
    generation = generate(
        streaming.model,
        streaming.tokenizer,
        prompt_tokens,
        params,
        prefill_step_size=prefill_step_size,
        on_text=on_text,
    )
    return run_report(streaming, generation, before, streaming.backend.stats())


def run_prompt(
    options: ModelOptions,
    prompt: str,
    params: SamplingParams,
    *,
    chat: bool = False,
    prefill_step_size: int = 512,
    on_text: OnText | None = None,
) -> dict:
    """Open the model, generate from `prompt`, close it; return the run's JSON (`flashmesh run`)."""
    streaming = open_model(options)
    try:
        tokens = encode_prompt(streaming.tokenizer, prompt, chat=chat)
        return generate_report(streaming, tokens, params, prefill_step_size=prefill_step_size, on_text=on_text)
    finally:
        streaming.close()
