"""The one generation loop: mlx-lm's stream_generate, samplers, logits processors and tokenizer
wrapper, with stop sequences, cancellation and per-token callbacks, for `run`, the demo, `serve`
and the benchmarks.

What one sequence needs (its settings, stop matching, streamed text, cancel check, timings) is a
`Generation`, fed one token at a time; `generate` drives one Generation with stream_generate. A
batched step (mlx-lm's BatchGenerator over the same dispatch) drives many, one per sequence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
from flashmesh.node.shutdown import stop_points
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

OnText = Callable[[str, int], None]  # (new text, tokens generated so far)
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (tokens so far [L], logits [1, V]) -> logits


class Constraint(Protocol):
    """What the output must match (a grammar): a fresh stateful logits processor per sequence, told
    the sequence's token budget (so that it can close what it enforces before the budget ends)."""

    def processor(self, *, max_tokens: int) -> LogitsProcessor: ...


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 0 or 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    stop: tuple[str, ...] = ()  # text that ends the generation (not included in it)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    constraint: Constraint | None = None  # e.g. a JSON schema the output must match

    def sampler(self):
        return make_sampler(temp=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self) -> list[LogitsProcessor]:
        processors = make_logits_processors(
            logit_bias=dict(self.logit_bias) or None,
            presence_penalty=self.presence_penalty or None,
            frequency_penalty=self.frequency_penalty or None,
        )
        if self.constraint is not None:  # last: it masks what the others left
            processors.append(self.constraint.processor(max_tokens=self.max_tokens))
        return processors


@dataclass
class GenerationStats:
    tokens: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float  # prompt in -> first token out (prefill)
    decode_tokens_per_s: float  # tokens after the first, per second
    finish_reason: str | None = None  # "stop", "length" or "cancelled"


class StopMatcher:
    """Cuts generated text at the first stop sequence and holds back any tail that could be the
    start of one, so streamed text never shows part of a stop sequence."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add `piece`; return (text safe to emit now, whether a stop sequence was reached)."""
        self.text += piece
        starts = [i for s in self.stops if (i := self.text.find(s, self.emitted)) >= 0]
        if starts:
            self.text = self.text[: min(starts)]
            return self._emit(len(self.text)), True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.emitted), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self._emit(len(self.text) - hold), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return out


class Generation:
    """One sequence being generated. `add` takes each token with its new text and says whether the
    sequence has ended (a stop sequence, the model's end, max_tokens, or `cancelled()`); `finish`
    returns its statistics. Timings run from construction."""

    def __init__(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        *,
        on_text: OnText | None = None,
        on_token: Callable[[int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.on_text = on_text
        self.on_token = on_token
        self.cancelled = cancelled or (lambda: False)
        self.tokens: list[int] = []
        self.finish_reason: str | None = "cancelled" if self.cancelled() else None
        self._matcher = StopMatcher(params.stop)
        self._start = time.perf_counter()
        self._first_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, text: str, finish_reason: str | None = None) -> bool:
        """One generated token; True once the sequence has ended (feed it no more)."""
        self._first_at = self._first_at or time.perf_counter()
        self.tokens.append(int(token))
        if self.on_token is not None:
            self.on_token(len(self.tokens))
        piece, stopped = self._matcher.feed(text)
        self._say(piece)
        if stopped:
            self.finish_reason = "stop"
        elif finish_reason is not None:
            self.finish_reason = finish_reason
        elif self.cancelled():
            self.finish_reason = "cancelled"
        return self.ended

    def finish(self) -> GenerationStats:
        if self.finish_reason != "cancelled":
            self._say(self._matcher.flush())  # text held back for a stop sequence that never came
        end = time.perf_counter()
        first_at = self._first_at or end
        decode = len(self.tokens) - 1
        return GenerationStats(
            tokens=self.tokens,
            text=self._matcher.text,
            prompt_tokens=len(self.prompt_tokens),
            ttft_s=first_at - self._start,
            decode_tokens_per_s=decode / (end - first_at) if decode > 0 and end > first_at else 0.0,
            finish_reason=self.finish_reason,
        )

    def _say(self, text: str) -> None:
        if text and self.on_text is not None:
            self.on_text(text, len(self.tokens))


def generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt_tokens: list[int],
    params: SamplingParams,
    *,
    prefill_step_size: int = 512,
    on_text: OnText | None = None,
    on_token: Callable[[int], None] | None = None,
    on_logprobs: Callable[[int, mx.array], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> GenerationStats:
    """Generate one sequence (greedy unless temperature > 0). `on_text` gets text as it can be shown,
    `on_token` the count after each token, `on_logprobs` each token with its distribution (logprobs
    [V], before the sampler); `cancelled` is asked after each. Timings cover this call."""
    with stop_points() as stopped:  # SIGTERM / Ctrl-C in `run` or the demo end it between two tokens
        return _generate(model, tokenizer, prompt_tokens, params, prefill_step_size, on_text, on_token,
                         on_logprobs, lambda: stopped() or (cancelled is not None and cancelled()))  # fmt: skip


def _generate(model, tokenizer, prompt_tokens, params, prefill_step_size, on_text, on_token, on_logprobs, cancelled):
    generation = Generation(prompt_tokens, params, on_text=on_text, on_token=on_token, cancelled=cancelled)
    if params.seed is not None:
        mx.random.seed(params.seed)
    if not generation.ended:
        for response in stream_generate(
            model,
            tokenizer,
            prompt_tokens,
            max_tokens=params.max_tokens,
            sampler=params.sampler(),
            logits_processors=params.logits_processors() or None,
            prefill_step_size=prefill_step_size,
        ):
            if on_logprobs is not None:
                on_logprobs(response.token, response.logprobs)
            if generation.add(response.token, response.text, response.finish_reason):
                break
    return generation.finish()


def encode_prompt(tokenizer: TokenizerWrapper, prompt: str, *, chat: bool) -> list[int]:
    if chat and tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)
