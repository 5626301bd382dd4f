"""Decode measurements shared by the engine benchmarks: one streamed generation with statistics."""

from __future__ import annotations

import logging
from pathlib import Path

from flashmesh.coordinator.dispatch import set_lookahead
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions

log = logging.getLogger(__name__)

PROMPT = "The quick brown fox jumps over the lazy dog. Mixture of experts models route every token"


def streamed_decode(
    store: Path,
    *,
    ram_budget: int,
    max_tokens: int,
    lookahead: bool = True,
    policy: str = "auto",
    prompt: str = PROMPT,
    page_cache: bool = False,
    queue_depth: int = 8,
) -> dict:
    """Generate greedily with experts streamed from `store`; return tokens and engine statistics."""
    streaming = open_model(
        ModelOptions(store=store, ram_budget=ram_budget, page_cache=page_cache, queue_depth=queue_depth)
    )
    try:
        set_lookahead(streaming.model, enabled=lookahead)
        streaming.cache.policy = policy
        tokens = encode_prompt(streaming.tokenizer, prompt, chat=False)
        result = generate(streaming.model, streaming.tokenizer, tokens, SamplingParams(max_tokens=max_tokens))
        stats = streaming.cache.close_stats()
        store_stats = streaming.store.stats
        n = max(1, len(result.tokens))
        return {
            "tokens": result.tokens,
            "lookahead": lookahead,
            "policy": policy,
            "effective_policy": streaming.cache.effective_policy,
            "ram_budget_bytes": ram_budget,
            "expert_bytes_total": streaming.manifest.expert_bytes_total,
            "ttft_s": result.ttft_s,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "hit_rate": stats.hit_rate,
            "misses": stats.misses,
            "hits": stats.hits,
            "bytes_read": stats.bytes_read,
            "bytes_read_per_token": stats.bytes_read / n,
            # experts not resident when first wanted (read on demand or by a prefetch): the bound's bytes
            "missed_expert_bytes_per_token": (stats.misses + stats.prefetch_used)
            * streaming.manifest.layers[0].payload_bytes
            / n,
            "prefetched": stats.prefetched,
            "prefetch_used": stats.prefetch_used,
            "prefetch_wasted": stats.prefetch_wasted,
            "prefetch_coverage": stats.prefetch_coverage,
            "wasted_per_useful": stats.wasted_per_useful,
            "io_wait_seconds": stats.io_seconds,
            "compute_seconds": stats.compute_seconds,
            "peak_cache_bytes": stats.peak_bytes,
            "store_read_gbps": store_stats.bytes / store_stats.seconds / 1e9 if store_stats.seconds else 0.0,
        }
    finally:
        streaming.close()
