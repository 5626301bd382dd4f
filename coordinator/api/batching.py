"""Continuous batching on the MLX thread: mlx-lm's BatchGenerator over the open model, one
`Generation` (coordinator.generate) per sequence for its stop sequences, text and timings.

Sequences join and leave at token boundaries. Each `step` is one BatchGenerator.next(): one decode
step of every generating sequence ([B, 1] through the model, so each MoE layer makes one dispatch
call for the whole batch and an expert is read once for all the sequences routed to it), then at
most one prefill chunk (`prefill_step_size` tokens of at most `prefill_batch` prompts), which
bounds how long a joining request can stall the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.nn as nn
from flashmesh.coordinator.api.jobs import DoneEvent, ErrorEvent, Event, Job, TextEvent, TokenLogprob
from flashmesh.coordinator.api.prompt_cache import PromptCache
from flashmesh.coordinator.generate import Generation, GenerationStats
from mlx_lm.generate import BatchGenerator, _merge_caches, make_stop_sequences
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)


def can_batch(model: nn.Module) -> bool:
    """Whether mlx-lm can hold this model's KV caches in a batch (llama4's chunked and deepseek_v41's
    layer caches cannot): asks mlx-lm's own merge, as its BatchGenerator will."""
    try:
        _merge_caches([make_prompt_cache(model)])
    except (ValueError, AttributeError, TypeError, NotImplementedError):
        return False
    return True


@dataclass(eq=False)
class _Sequence:
    job: Job
    detokenizer: object
    cached_tokens: int
    cacheable: bool
    generation: Generation | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent: int = 0  # logprobs already sent with text


class ContinuousBatch:
    """The running batch. `send(job, event)` delivers events; `observe(job, stats)` sees each
    finished generation (metrics). Not thread-safe: the MLX thread only."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TokenizerWrapper,
        *,
        send: Callable[[Job, Event], None],
        observe: Callable[[Job, GenerationStats], None],
        max_batch: int = 8,
        prefill_batch: int = 2,
        prefill_step_size: int = 512,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_batch, self.prefill_step_size = (
            max_batch,
            min(prefill_batch, max_batch),
            prefill_step_size,
        )
        self.prompt_cache = prompt_cache
        self._send, self._observe = send, observe
        self._stops = make_stop_sequences(tokenizer)  # the end-of-sequence tokens; stop strings are Generation's
        self._sequences: dict[int, _Sequence] = {}
        self._generator = self._new_generator()

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.prefill_batch,
            prefill_step_size=self.prefill_step_size,
        )

    def __len__(self) -> int:
        return len(self._sequences)

    @property
    def full(self) -> bool:
        return len(self._sequences) >= self.max_batch

    def add(self, job: Job, *, use_cache: bool = True) -> None:
        """Join the batch (its prefill starts at the next step). use_cache: look the prompt up in the
        prompt cache, and keep this sequence's KV there when it ends."""
        prompt = job.prompt_tokens
        use_cache = use_cache and self.prompt_cache is not None
        cache, rest = self.prompt_cache.fetch(prompt) if use_cache else (None, list(prompt))
        seq = _Sequence(job, self.tokenizer.detokenizer, len(prompt) - len(rest), use_cache)
        seq.generation = Generation(
            prompt, job.params, on_text=lambda text, n: self._text(seq, text, n), cancelled=lambda: job.cancelled
        )
        params = job.params
        (uid,) = self._generator.insert(
            [rest],
            max_tokens=[params.max_tokens],
            caches=[cache],
            all_tokens=[list(prompt[: seq.cached_tokens])],
            samplers=[None if params.temperature == 0 else params.sampler()],  # None: the shared greedy sampler
            logits_processors=[params.logits_processors()],
            stop_sequences=[self._stops],
        )
        self._sequences[uid] = seq

    def step(self) -> int:
        """One decode step and at most one prefill chunk; return how many sequences decoded."""
        self._drop_cancelled()
        if not self._sequences:
            return 0
        _, responses = self._generator.next()
        ended = []
        for r in responses:
            seq = self._sequences[r.uid]
            eos = r.finish_reason == "stop"  # mlx-lm's stop here is an end-of-sequence token
            if seq.job.logprobs is not None and not eos:
                seq.logprobs.append(TokenLogprob.of(r.token, r.logprobs, seq.job.logprobs))
            # As mlx-lm's stream_generate: the end-of-sequence token adds no text.
            if not eos:
                seq.detokenizer.add_token(r.token)
            if r.finish_reason is not None:
                seq.detokenizer.finalize()
            if seq.generation.add(r.token, seq.detokenizer.last_segment, r.finish_reason):
                if r.finish_reason is not None:  # the generator has let it go already
                    self._finish(r.uid, r.all_tokens, r.prompt_cache)
                else:
                    ended.append(r.uid)
        self._remove(ended)
        return len(responses)

    def fail_all(self, error: BaseException) -> None:
        """The step raised: every sequence in the batch gets the error; start from an empty batch."""
        for seq in self._sequences.values():
            self._send(seq.job, ErrorEvent(error))
        self._sequences.clear()
        self._generator.close()
        self._generator = self._new_generator()

    def close(self) -> None:
        self._generator.close()

    # --- inside ------------------------------------------------------------------------------------
    def _text(self, seq: _Sequence, text: str, tokens: int) -> None:
        logprobs, seq.sent = tuple(seq.logprobs[seq.sent :]), len(seq.logprobs)
        self._send(seq.job, TextEvent(text, tokens, logprobs))

    def _drop_cancelled(self) -> None:
        cancelled = [uid for uid, seq in self._sequences.items() if seq.job.cancelled]
        for uid in cancelled:
            self._sequences[uid].generation.finish_reason = "cancelled"
        self._remove(cancelled)

    def _remove(self, uids: list[int]) -> None:
        if not uids:
            return
        caches = self._generator.remove(uids, return_prompt_caches=True)
        for uid in uids:
            cache, tokens = caches.get(uid, (None, None))
            self._finish(uid, tokens, cache)

    def _finish(self, uid: int, tokens: list[int] | None, cache: list | None) -> None:
        seq = self._sequences.pop(uid)
        if seq.cacheable and tokens and cache:
            self.prompt_cache.store(tokens, cache)
        stats = seq.generation.finish()
        self._observe(seq.job, stats)
        self._send(seq.job, DoneEvent(stats, tuple(seq.logprobs), cached_tokens=seq.cached_tokens))
