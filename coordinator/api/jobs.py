"""What the HTTP layer hands the MLX thread (a Job) and what comes back (events, on the MLX thread)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from flashmesh.coordinator.generate import GenerationStats, SamplingParams


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after_s: int) -> None:
        super().__init__(f"the server is busy ({depth} requests waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class WorkerClosed(Exception):
    pass


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # of the sampled token, after logits processors (penalties, bias, grammar), before temperature
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens (id, logprob), best first

    @classmethod
    def of(cls, token: int, logprobs: mx.array, top: int) -> TokenLogprob:
        """From a step's distribution (logprobs [V], evaluated); tokens the grammar forbids never appear."""
        best: tuple[tuple[int, float], ...] = ()
        if top > 0:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            pairs = sorted(zip(ids.tolist(), logprobs[ids].tolist(), strict=True), key=lambda p: -p[1])
            best = tuple((i, v) for i, v in pairs if v > -float("inf"))
        return cls(int(token), float(logprobs[token].item()), best)


@dataclass(frozen=True)
class TextEvent:
    text: str  # new text since the last event (never part of a stop sequence)
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # tokens since the last event, when the job asked for them


@dataclass(frozen=True)
class DoneEvent:
    stats: GenerationStats  # finish_reason: "stop", "length" or "cancelled"
    logprobs: tuple[TokenLogprob, ...] = ()  # every generated token's (end-of-sequence token excluded)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


Event = TextEvent | DoneEvent | ErrorEvent


@dataclass(eq=False)
class Job:
    """One sequence to generate. logprobs: None, or how many top alternatives to report per token
    (0: the sampled token's only)."""

    prompt_tokens: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    logprobs: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when it joined the batch
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def alone(self) -> bool:
        """A seeded sampled generation owns the random state: it runs with nothing beside it."""
        return self.params.seed is not None and self.params.temperature > 0
