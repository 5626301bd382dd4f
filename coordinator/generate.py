"""Generation with mlx-lm's own stream_generate, samplers and tokenizer wrapper, plus statistics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import mlx.nn as nn
from flashmesh.node.cache import CacheStats
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper


@dataclass
class GenerationStats:
    tokens: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float  # prompt in -> first token out (prefill)
    decode_tokens_per_s: float  # tokens after the first, per second
    cache_hit_rate: float = 0.0
    expert_bytes_read: int = 0
    read_gbps: float = 0.0  # bytes read / seconds waiting on reads
    io_seconds: float = 0.0
    compute_seconds: float = 0.0  # seconds in expert compute
    ram_budget_bytes: int = 0
    expert_bytes_total: int = 0
    peak_cache_bytes: int = 0
    bytes_read_per_token: float = 0.0
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def encode_prompt(tokenizer: TokenizerWrapper, prompt: str, *, chat: bool) -> list[int]:
    if chat and tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)


def generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt_tokens: list[int],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 0.0,
    prefill_step_size: int = 512,
    on_text: Callable[[str], None] | None = None,
) -> GenerationStats:
    """Generate; greedy unless temperature > 0. Timings cover only this call."""
    sampler = make_sampler(temp=temperature, top_p=top_p)
    tokens: list[int] = []
    text: list[str] = []
    start = time.perf_counter()
    first_at = None
    finish = None
    for response in stream_generate(
        model, tokenizer, prompt_tokens, max_tokens=max_tokens, sampler=sampler, prefill_step_size=prefill_step_size
    ):
        if first_at is None:
            first_at = time.perf_counter()
        tokens.append(int(response.token))
        text.append(response.text)
        finish = response.finish_reason
        if on_text is not None and response.text:
            on_text(response.text)
    end = time.perf_counter()
    first_at = first_at or end
    decode = len(tokens) - 1
    return GenerationStats(
        tokens=tokens,
        text="".join(text),
        prompt_tokens=len(prompt_tokens),
        ttft_s=first_at - start,
        decode_tokens_per_s=decode / (end - first_at) if decode > 0 and end > first_at else 0.0,
        finish_reason=finish,
    )


def add_cache_stats(
    stats: GenerationStats, cache: CacheStats, *, ram_budget_bytes: int, expert_bytes_total: int
) -> GenerationStats:
    stats.cache_hit_rate = cache.hit_rate
    stats.expert_bytes_read = cache.bytes_read
    stats.read_gbps = cache.read_gbps
    stats.io_seconds = cache.io_seconds
    stats.compute_seconds = cache.compute_seconds
    stats.peak_cache_bytes = cache.peak_bytes
    stats.ram_budget_bytes = ram_budget_bytes
    stats.expert_bytes_total = expert_bytes_total
    stats.bytes_read_per_token = cache.bytes_read / max(1, len(stats.tokens))
    return stats
