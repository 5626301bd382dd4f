"""Recording the engine's routing: an ExpertBackend wrapper that keeps the expert ids every dispatch
receives (and what the router lookahead would have predicted), then delegates.

Because it sits between the dispatch and any backend (in-process, remote nodes), the trace is the
engine's own, whatever runs the experts. Used by `python -m bench routing` and the policy tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmesh.coordinator.dispatch import ExpertBackend, ExpertDispatch, Lookahead, bind_backend, set_lookahead
from flashmesh.coordinator.engine import open_model
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions, default_budget
from flashmesh.node.cache_stats import ExpertStats
from flashmesh.node.store_format import Manifest

from bench.routing import Steps


def _rows_top_k(router: nn.Module, x: mx.array, k: int) -> np.ndarray:
    """The top-k experts per row that `router` picks for x [N, D] -> [N, k] (as Lookahead does)."""
    out = router(x)
    if isinstance(out, tuple):  # a gate returning (indices, scores)
        return np.array(out[0])
    return np.array(mx.argpartition(-out.astype(mx.float32), kth=k - 1, axis=-1)[..., :k])


@dataclass(eq=False)
class TracingBackend:
    """Delegates to `inner`; records (layer, ids [N, k], next layer, predicted ids [N, k] | None)."""

    inner: ExpertBackend
    predictors: dict[int, Lookahead]  # layer -> the next layer's router, applied to this layer's input
    calls: list[tuple[int, np.ndarray, int | None, np.ndarray | None]] = field(default_factory=list)

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        # the dispatch passes mlx-lm's own shapes (x [..., D], indices [..., k]): one row per token here
        ids = np.array(indices).reshape(-1, indices.shape[-1])  # [N, k]
        la = self.predictors.get(layer)
        rows = x.reshape(-1, x.shape[-1])  # [N, D]
        predicted = None if la is None else _rows_top_k(la.router, rows, ids.shape[-1])
        self.calls.append((layer, ids, None if la is None else la.layer, predicted))
        return self.inner.compute(layer, x, indices)

    def hint(self, layer: int, experts: list[int]) -> None:
        self.inner.hint(layer, experts)

    def stats(self) -> ExpertStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()

    def take_steps(self) -> tuple[Steps, Steps]:
        """The calls so far as per-token (chosen, predicted) steps; clears them."""
        steps: Steps = []
        predicted: Steps = []
        first = min(c[0] for c in self.calls) if self.calls else 0
        chunk_start = 0
        for layer, ids, following, guess in self.calls:
            if layer == first:  # a new forward pass: its rows are the next tokens
                chunk_start = len(steps)
                steps.extend({} for _ in range(len(ids)))
                predicted.extend({} for _ in range(len(ids)))
            for row in range(len(ids)):
                steps[chunk_start + row][layer] = ids[row]
                if guess is not None:
                    predicted[chunk_start + row][following] = guess[row]
        self.calls = []
        return steps, predicted


def install_tracer(model: nn.Module, backend: ExpertBackend) -> TracingBackend:
    """Put a TracingBackend between every ExpertDispatch of `model` and `backend`."""
    set_lookahead(model, enabled=True)  # builds the next-layer predictors the engine would use
    dispatches = [m for _, m in model.named_modules() if isinstance(m, ExpertDispatch)]
    predictors = {d.layer: d.lookahead for d in dispatches if d.lookahead is not None}
    tracer = TracingBackend(backend, predictors)
    bind_backend(model, tracer, lookahead=False)
    return tracer


def trace_store(
    store: Path, *, prompt_tokens: list[int] | None, prompt: str, max_tokens: int, temperature: float, seed: int = 0
) -> tuple[dict[str, tuple[Steps, Steps]], str]:
    """Routing of (a) "prompt": a long real-text prompt, token by token (its prefill), and (b)
    "generation": the tokens generated from `prompt` (its decode steps); and the generated text.
    Everything fits in RAM (up to half the machine's)."""
    manifest = Manifest.load(store)
    streaming = open_model(ModelOptions(store=store, ram_budget=default_budget(manifest)))
    try:
        tracer = install_tracer(streaming.model, streaming.backend)
        phases = {}
        if prompt_tokens:
            generate(streaming.model, streaming.tokenizer, prompt_tokens, SamplingParams(max_tokens=1))
            steps, predicted = tracer.take_steps()
            phases["prompt"] = (steps[: len(prompt_tokens)], predicted[: len(prompt_tokens)])
        tokens = encode_prompt(streaming.tokenizer, prompt, chat=False)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        result = generate(streaming.model, streaming.tokenizer, tokens, params)
        steps, predicted = tracer.take_steps()
        phases["generation"] = (steps[len(tokens) :], predicted[len(tokens) :])  # decode steps only
        return phases, result.text
    finally:
        streaming.close()
