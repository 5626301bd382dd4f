"""Generation with a fault injected at a chosen MoE layer call, and waiting until a hurt node is
taken back: for the fault tests and the failover benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable

from flashmesh.coordinator.engine import StreamingModel
from flashmesh.coordinator.generate import SamplingParams, encode_prompt, generate


def generate_with_faults(
    streaming: StreamingModel, prompt: str, *, max_tokens: int, on_layer_call: Callable[[int], None] | None = None
) -> list[int]:
    """Greedy tokens; `on_layer_call(n)` runs before the n-th MoE layer call (to inject a fault there)."""
    backend = streaming.backend
    if on_layer_call is not None:
        compute, calls = backend.compute, [0]

        def hooked(layer, x, indices):
            calls[0] += 1
            on_layer_call(calls[0])
            return compute(layer, x, indices)

        backend.compute = hooked  # the instance's, so every dispatch of the model calls it
    try:
        tokens = encode_prompt(streaming.tokenizer, prompt, chat=False)
        return generate(streaming.model, streaming.tokenizer, tokens, SamplingParams(max_tokens=max_tokens)).tokens
    finally:
        backend.__dict__.pop("compute", None)


def wait_taken_back(backend, *, timeout: float = 30.0) -> float | None:
    """Seconds until every node of `backend` (coordinator.remote.RemoteExperts) is up again, probing
    as an idle `serve` does (poll_health: each down node once its back-off has passed); None: not
    within `timeout`. What a test or benchmark waits on after repairing a node, instead of a sleep."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        backend.poll_health()
        if not backend.membership.down():
            return time.monotonic() - start
        time.sleep(0.05)
    return None
