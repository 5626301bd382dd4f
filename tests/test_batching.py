"""Continuous batching (coordinator/api/batching.py): sequences that join a running batch at token
boundaries get exactly the greedy tokens mlx-lm gives each alone, and the same as mlx-lm's own
BatchGenerator on the unpacked model with the same joins; each decode step is one MoE call per
layer for the whole batch, in-process and on nodes (one request per node per layer).

Logprob tolerance: on CPU, mlx-lm's batched path (left padding, masks, [B, ...] matmuls) gave
bit-identical logprobs to its single-sequence path for qwen3_moe, mixtral, deepseek_v3 and
qwen3_next, and differences up to 1.4e-6 for gpt_oss (its sliding-window layers); the streamed
experts add the wave regrouping of test_equivalence.py (<= 1e-4) when the budget is small.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from flashmesh.coordinator.api.batching import ContinuousBatch, can_batch
from flashmesh.coordinator.api.jobs import DoneEvent, ErrorEvent, Job
from flashmesh.coordinator.api.worker import GenerationWorker
from flashmesh.coordinator.dispatch import bind_backend
from flashmesh.coordinator.engine import attach, load_dense_model, load_store_tokenizer, open_model
from flashmesh.coordinator.generate import SamplingParams, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.coordinator.placement import NodeCapacity, place
from flashmesh.coordinator.remote import RemoteExperts
from flashmesh.node.shard import write_dense
from flashmesh.node.store_format import Manifest
from flashmesh.testing.arch_check import build_and_pack
from flashmesh.testing.in_process import InProcessLink
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, make_stop_sequences, stream_generate

from .conftest import PROMPT, shard_services

PROMPTS = [
    PROMPT,
    "Hello",
    "Streaming experts from flash, one token at a time, is what we do here all day long.",
    "What is the capital of France?",
]
JOINS = {0: [0], 2: [1, 2], 5: [3]}  # decode step -> the prompts that join then
MAX_TOKENS = 14
PREFILL_STEP = 8  # several prefill chunks per prompt, interleaved with the others' decode steps


def ours(model, tokenizer, prompts, *, max_tokens=MAX_TOKENS) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs per prompt, joining our batch on the JOINS schedule."""
    done: dict[int, DoneEvent] = {}

    def send(job: Job, event) -> None:
        assert not isinstance(event, ErrorEvent), event.error
        if isinstance(event, DoneEvent):
            done[int(job.id)] = event

    batch = ContinuousBatch(
        model, tokenizer, send=send, observe=lambda *_: None, max_batch=4, prefill_step_size=PREFILL_STEP
    )
    step = 0
    while len(done) < len(prompts):
        for i in JOINS.get(step, []):
            job = Job(tokenizer.encode(prompts[i]), SamplingParams(max_tokens=max_tokens), lambda e: None, logprobs=0)
            job.id = str(i)
            batch.add(job)
        batch.step()
        step += 1
    return [(done[i].stats.tokens, [lp.logprob for lp in done[i].logprobs]) for i in range(len(prompts))]


def mlx_lm_batch(model, tokenizer, prompts) -> list[tuple[list[int], list[float]]]:
    """mlx-lm's own BatchGenerator on the unpacked model, the same joins and prefill chunks."""
    generator = BatchGenerator(model, completion_batch_size=4, prefill_batch_size=2, prefill_step_size=PREFILL_STEP)
    stops = make_stop_sequences(tokenizer)
    uids, out, finished, step = {}, {}, set(), 0
    while len(finished) < len(prompts):
        for i in JOINS.get(step, []):
            (uid,) = generator.insert([tokenizer.encode(prompts[i])], max_tokens=[MAX_TOKENS], stop_sequences=[stops])
            uids[uid] = i
        for r in generator.next()[1]:
            tokens, logprobs = out.setdefault(uids[r.uid], ([], []))
            tokens.append(r.token)
            if r.finish_reason != "stop":
                logprobs.append(r.logprobs[r.token].item())
            if r.finish_reason is not None:
                finished.add(r.uid)
        step += 1
    return [out[i] for i in range(len(prompts))]


def alone(model, tokenizer, prompts) -> list[list[int]]:
    return [
        generate(model, tokenizer, tokenizer.encode(p), SamplingParams(max_tokens=MAX_TOKENS)).tokens for p in prompts
    ]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "qwen3_next"])  # KV, rotating + KV, arrays + KV caches
def test_batched_tokens_are_each_sequence_alone(models, arch):
    src, store = models.get(arch)
    ref_model, tokenizer = load(str(src))
    reference_alone = alone(ref_model, tokenizer, PROMPTS)
    reference_batch = mlx_lm_batch(ref_model, tokenizer, PROMPTS)
    manifest = Manifest.load(store)
    streaming = open_model(
        ModelOptions(store=store, ram_budget=max(manifest.expert_bytes_total // 4, manifest.min_budget_bytes))
    )
    try:
        assert can_batch(streaming.model)
        batched = ours(streaming.model, streaming.tokenizer, PROMPTS)
    finally:
        streaming.close()
    for (tokens, logprobs), (ref_tokens, ref_logprobs), solo in zip(
        batched, reference_batch, reference_alone, strict=True
    ):
        assert tokens == ref_tokens == solo
        np.testing.assert_allclose(logprobs, ref_logprobs, rtol=0, atol=1e-4)


class CountingBackend:
    """The ExpertBackend protocol around another backend, recording the rows of each compute call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int]] = []  # (layer, rows)

    def compute(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        self.calls.append((layer, x.shape[0]))
        return self.inner.compute(layer, x, indices)

    def hint(self, layer: int, experts: list[int]) -> None:
        self.inner.hint(layer, experts)

    def stats(self):
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def counted(models):
    """The qwen3_moe store opened in-process with a CountingBackend bound; (store, model, counting)."""
    _, store = models.get("qwen3_moe")
    streaming = open_model(ModelOptions(store=store))
    counting = CountingBackend(streaming.backend)
    bind_backend(streaming.model, counting)
    yield store, streaming, counting
    streaming.close()


def test_a_decode_step_is_one_moe_call_per_layer_for_the_batch(counted):
    store, streaming, counting = counted
    prompts = PROMPTS[:3]
    tokenizer = streaming.tokenizer
    batch = ContinuousBatch(streaming.model, tokenizer, send=lambda *_: None, observe=lambda *_: None)
    for p in prompts:
        batch.add(Job(tokenizer.encode(p), SamplingParams(max_tokens=20), lambda e: None))
    while batch.step() < len(prompts):  # prefill, then the first step that decodes all three
        counting.calls.clear()
    assert counting.calls == [(spec.layer, len(prompts)) for spec in Manifest.load(store).layers]


def test_batched_on_nodes_matches_and_sends_one_request_per_node_per_layer(models, tmp_path):
    src, store = models.get("qwen3_moe")
    ref_model, tokenizer = load(str(src))
    reference = alone(ref_model, tokenizer, PROMPTS)
    services = shard_services(store, tmp_path)
    try:
        manifest = Manifest.load(store)
        write_dense(store, tmp_path / "dense")
        model, _, _ = load_dense_model(tmp_path / "dense")
        links = {s.node_id: InProcessLink(s, s.name) for s in services}
        remote = RemoteExperts(links, place(manifest.layers, [NodeCapacity.of(s.info()) for s in services]))
        attach(model, remote)
        batched = ours(model, load_store_tokenizer(tmp_path / "dense", manifest), PROMPTS)
        assert [tokens for tokens, _ in batched] == reference
        dispatch = remote.dispatch
        assert dispatch.layer_calls > 0 and dispatch.requests <= dispatch.layer_calls * len(services)
    finally:
        for s in services:
            s.close()


def test_a_long_prompt_joining_stalls_the_batch_by_one_chunk_per_step(counted):
    """While a long prompt is prefilled chunk by chunk, the running sequence gets a token every step."""
    _, streaming, counting = counted
    tokenizer = streaming.tokenizer
    batch = ContinuousBatch(
        streaming.model, tokenizer, send=lambda *_: None, observe=lambda *_: None, prefill_step_size=PREFILL_STEP
    )
    batch.add(Job(tokenizer.encode("Hello"), SamplingParams(max_tokens=60), lambda e: None))
    while batch.step() == 0:
        pass
    long_prompt = tokenizer.encode(PROMPT * 4)
    batch.add(Job(long_prompt, SamplingParams(max_tokens=4), lambda e: None))
    steps = decoded = 0
    while decoded < 2 and steps < 50:  # until the long prompt is in and decoding beside the first
        counting.calls.clear()
        decoded = batch.step()
        steps += 1
        rows = max(n for _, n in counting.calls)  # the most rows one MoE call had in this step
        assert decoded >= 1 and rows <= 1 + PREFILL_STEP  # one decode token + at most one chunk
    assert decoded == 2 and steps >= len(long_prompt) // PREFILL_STEP  # the prompt really went in chunks


def served_together(worker: GenerationWorker, requests: list[tuple[str, SamplingParams]]) -> list[list[int]]:
    """Submit every request at once to a started worker; the tokens of each."""
    done = [threading.Event() for _ in requests]
    out: list = [None] * len(requests)

    def on_event(i: int, event) -> None:
        if isinstance(event, ErrorEvent | DoneEvent):
            out[i] = event
            done[i].set()

    for i, (prompt, params) in enumerate(requests):
        worker.submit(worker.tokenizer.encode(prompt), params, lambda e, i=i: on_event(i, e))
    for d in done:
        assert d.wait(120)
    assert not any(isinstance(e, ErrorEvent) for e in out), out
    return [e.stats.tokens for e in out]


def test_a_seeded_sampled_request_beside_a_batch_gets_what_it_gets_alone(models):
    """mlx-lm's batch shares one random state: a seeded sampled request waits for the batch to drain
    and runs alone, so its seed reproduces it whatever else is served; the greedy ones still batch."""
    src, store = models.get("qwen3_moe")
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=5)
    greedy = SamplingParams(max_tokens=MAX_TOKENS)
    worker = GenerationWorker(lambda: open_model(ModelOptions(store=store)), max_batch=4).start()
    try:
        (by_itself,) = served_together(worker, [(PROMPTS[1], seeded)])
        mixed = served_together(worker, [(PROMPTS[0], greedy), (PROMPTS[1], seeded), (PROMPTS[2], greedy)])
    finally:
        worker.close()
    model, tokenizer = load(str(src))
    assert mixed[1] == by_itself
    assert [mixed[0], mixed[2]] == alone(model, tokenizer, [PROMPTS[0], PROMPTS[2]])


def test_a_model_mlx_lm_cannot_batch_is_served_one_at_a_time(tmp_path):
    """llama4's chunked KV cache cannot join mlx-lm's batch: concurrent requests are still served,
    one after another through the single-sequence loop, each with mlx-lm's greedy tokens."""
    packed = build_and_pack(tmp_path, "llama4")
    worker = GenerationWorker(lambda: open_model(ModelOptions(store=packed.store)), max_batch=4).start()
    try:
        assert not worker.batching
        ours = served_together(worker, [(p, SamplingParams(max_tokens=MAX_TOKENS)) for p in PROMPTS[:3]])
    finally:
        worker.close()
    model, tokenizer = load(str(packed.source))
    for prompt, tokens in zip(PROMPTS[:3], ours, strict=True):  # mlx-lm's own single-sequence loop
        assert tokens == [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)]
