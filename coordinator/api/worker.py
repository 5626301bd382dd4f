"""The one thread that does MLX work for the server, fed by a bounded queue.

Jobs join a running batch (batching.ContinuousBatch: mlx-lm's BatchGenerator) at token boundaries,
up to `max_batch` at once, each with its own KV cache inside the batch. A job that needs the random
state to itself (a seeded sampled one, `Job.alone`) waits until the batch is empty, runs by itself,
then the batch reopens; a model whose caches mlx-lm cannot batch is served one job at a time
through the single-sequence loop (coordinator.generate). Events reach the caller through
`on_event`, called on the worker thread; a job whose `cancel()` is called stops at its next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import mlx.core as mx
from flashmesh.coordinator.api.batching import ContinuousBatch, can_batch
from flashmesh.coordinator.api.jobs import (  # noqa: F401 - the worker's public names
    DoneEvent,
    ErrorEvent,
    Event,
    Job,
    QueueFull,
    TextEvent,
    TokenLogprob,
    WorkerClosed,
)
from flashmesh.coordinator.api.prompt_cache import PromptCache
from flashmesh.coordinator.engine import StreamingModel
from flashmesh.coordinator.generate import GenerationStats, SamplingParams, generate
from flashmesh.node.shutdown import release_thread_mlx_state
from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import UserError
from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 1.0  # an idle worker probes cluster nodes that are down this often


class GenerationWorker:
    """Opens the model on its own thread and serves jobs from a bounded queue, batched.

    `open_model` runs on the worker thread (all MLX work stays there): `lambda: open_model(options)`
    (coordinator.engine), the same options `flashmesh run` takes. prompt_cache_entries 0: no
    prompt cache."""

    def __init__(
        self,
        open_model: Callable[[], StreamingModel],
        *,
        max_queue: int = 16,
        max_batch: int = 8,
        prefill_batch: int = 2,
        prefill_step_size: int = 512,
        prompt_cache_entries: int = 8,
        prompt_cache_bytes: int = 2**30,
        metrics=None,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be at least 1")
        self._open_model = open_model
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.max_queue, self.max_batch, self.prefill_batch = max_queue, max_batch, prefill_batch
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = (
            PromptCache(max_entries=prompt_cache_entries, max_bytes=prompt_cache_bytes)
            if prompt_cache_entries
            else None
        )
        self.metrics = metrics
        self._thread = threading.Thread(target=self._run, name="flashmesh-mlx", daemon=True)
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._open_error: BaseException | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._active: set[Job] = set()  # admitted, not yet done (any thread reads it under the lock)
        self._alone: Job | None = None  # waiting for the batch to empty
        self._seconds_per_job = 1.0  # moving average, for Retry-After
        self.streaming: StreamingModel | None = None
        self.batching = False  # whether the model's caches can be batched (known once open)
        self.started_at = time.time()

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> GenerationWorker:
        """Start the thread and wait until the model is open; raise what opening it raised."""
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            raise self._open_error
        return self

    def close(self, *, timeout: float = 30.0) -> None:
        """Cancel the running jobs, fail the waiting ones, stop the thread, close the model."""
        self._closing.set()
        with self._lock:
            running = list(self._active)
        for job in running:
            job.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._send(job, ErrorEvent(WorkerClosed("the server is shutting down")))
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("worker queue stayed full while closing")
        if not self._finished.wait(timeout):
            log.warning("the worker did not finish within %g s", timeout)

    @property
    def tokenizer(self) -> TokenizerWrapper:
        assert self.streaming is not None, "start() the worker first"
        return self.streaming.tokenizer

    @property
    def manifest(self) -> Manifest:
        assert self.streaming is not None, "start() the worker first"
        return self.streaming.manifest

    @property
    def queue_depth(self) -> int:
        """Jobs waiting, plus the ones running."""
        with self._lock:
            return self._queue.qsize() + len(self._active) + (self._alone is not None)

    # --- submitting ------------------------------------------------------------------------------
    def submit(
        self, prompt_tokens: list[int], params: SamplingParams, on_event: Callable[[Event], None], *,
        logprobs: int | None = None,
    ) -> Job:  # fmt: skip
        """Queue a generation; raise QueueFull when max_queue jobs already wait."""
        if self._closing.is_set() or self._finished.is_set():
            raise WorkerClosed("the server is shutting down")
        job = Job(list(prompt_tokens), params, on_event, logprobs=logprobs)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            depth = self._queue.qsize()
            per_slot = self._seconds_per_job / max(1, self.max_batch if self.batching else 1)
            raise QueueFull(depth, max(1, round(per_slot * depth))) from None
        return job

    # --- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.streaming = self._open_model()
            self.batching = can_batch(self.streaming.model)
        except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
            self._open_error = e
            self._finish()
            return
        if self.metrics is not None and self.prompt_cache is not None:
            self.metrics.watch_prompt_cache(self.prompt_cache)
        self._ready.set()
        batch = None
        try:
            if self.batching:
                batch = ContinuousBatch(
                    self.streaming.model, self.streaming.tokenizer, send=self._send, observe=self._observe,
                    max_batch=self.max_batch, prefill_batch=self.prefill_batch,
                    prefill_step_size=self.prefill_step_size, prompt_cache=self.prompt_cache,
                )  # fmt: skip
                self._serve_batched(batch)
            else:
                log.info("this model's KV caches cannot be batched by mlx-lm: serving one request at a time")
                self._serve_one_at_a_time()
        finally:
            try:
                if batch is not None:
                    batch.close()
                self.streaming.close()
            finally:
                self._finish()

    def _finish(self) -> None:
        release_thread_mlx_state()  # else the thread's end can race interpreter exit (node.shutdown)
        self._finished.set()
        self._ready.set()

    def _idle(self) -> None:
        """Between requests: probe cluster nodes that are down, so an idle server takes them back."""
        remote = self.streaming.remote
        if remote is not None:
            try:
                remote.poll_health()
            except UserError as e:  # a probe's trouble shows again on the next request
                log.warning("probing nodes: %s", e)

    def _next_job(self, *, wait: bool) -> Job | None:
        """The next queued job (None: stop); raises queue.Empty. Waiting, it probes down nodes meanwhile."""
        while True:
            try:
                return self._queue.get(block=wait, timeout=IDLE_POLL_SECONDS if wait else None)
            except queue.Empty:
                if not wait:
                    raise
                self._idle()

    def node_states(self) -> list[dict]:
        """Each cluster node's label and whether it is in use (a snapshot; empty in-process)."""
        remote = self.streaming.remote if self.streaming is not None else None
        if remote is None:
            return []
        states = remote.membership.states
        return [{"node": remote.links[n].label, "up": states[n].up, "reason": states[n].reason} for n in states]

    def _serve_batched(self, batch: ContinuousBatch) -> None:
        stopping = solo = False
        mark = self.streaming.backend.stats()
        while True:
            while not (stopping or solo or self._alone is not None or batch.full):
                try:
                    job = self._next_job(wait=len(batch) == 0)  # wait only when there is nothing to do
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                elif job.alone:
                    with self._lock:
                        self._alone = job
                else:
                    self._admit(batch, job)
            if len(batch) == 0:
                solo = False
                if self._alone is not None:  # the batch has drained: the seeded job runs by itself
                    job, solo = self._alone, True
                    mx.random.seed(job.params.seed)
                    self._admit(batch, job, use_cache=False)
                    with self._lock:
                        self._alone = None
                elif stopping:
                    return
                else:
                    continue
            try:
                decoded = batch.step()
            except Exception as e:  # noqa: BLE001 - reported to the batch's clients, the worker goes on
                log.warning("batch step failed: %s", e)
                with self._lock:
                    failed = list(self._active)
                batch.fail_all(e)
                for _ in failed:
                    if self.metrics is not None:
                        self.metrics.observe_failure()
                decoded = 0
            mark = self._observe_experts(mark, decoded)

    def _admit(self, batch: ContinuousBatch, job: Job, *, use_cache: bool = True) -> None:
        if job.cancelled:
            self._send(job, DoneEvent(GenerationStats([], "", len(job.prompt_tokens), 0.0, 0.0, "cancelled")))
            return
        if self._closing.is_set():
            self._send(job, ErrorEvent(WorkerClosed("the server is shutting down")))
            return
        job.started_at = time.monotonic()
        with self._lock:
            self._active.add(job)
        try:
            batch.add(job, use_cache=use_cache)
        except Exception as e:  # noqa: BLE001 - e.g. a cache mlx-lm cannot merge: this job fails alone
            log.warning("job %s could not join the batch: %s", job.id, e)
            self._send(job, ErrorEvent(e))

    def _serve_one_at_a_time(self) -> None:
        mark = self.streaming.backend.stats()
        eos = set(self.streaming.tokenizer.eos_token_ids)
        while (job := self._next_job(wait=True)) is not None:
            job.started_at = time.monotonic()
            with self._lock:
                self._active.add(job)
            logprobs: list[TokenLogprob] = []
            sent = [0]

            def keep(token: int, distribution: mx.array, job=job, logprobs=logprobs) -> None:
                if job.logprobs is not None and token not in eos:
                    logprobs.append(TokenLogprob.of(token, distribution, job.logprobs))

            def text(piece: str, n: int, job=job, logprobs=logprobs, sent=sent) -> None:
                new, sent[0] = tuple(logprobs[sent[0] :]), len(logprobs)
                self._send(job, TextEvent(piece, n, new))

            if job.params.seed is not None:
                mx.random.seed(job.params.seed)
            try:
                stats = generate(
                    self.streaming.model, self.streaming.tokenizer, job.prompt_tokens, job.params,
                    prefill_step_size=self.prefill_step_size, on_text=text, on_logprobs=keep,
                    cancelled=lambda job=job: job.cancelled,
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - reported to the job's client, the worker goes on
                log.warning("job %s failed: %s", job.id, e)
                if self.metrics is not None:
                    self.metrics.observe_failure()
                self._send(job, ErrorEvent(e))
            else:
                try:
                    self._observe(job, stats)
                except Exception as e:  # a bug after the generation (its figures): fail this job, keep serving
                    log.exception("job %s: failed after its generation", job.id)
                    self._send(job, ErrorEvent(e))
                else:
                    self._send(job, DoneEvent(stats, tuple(logprobs)))
            mark = self._observe_experts(mark, 1)

    def _send(self, job: Job, event: Event) -> None:
        if isinstance(event, DoneEvent | ErrorEvent):
            with self._lock:
                self._active.discard(job)
        try:
            job.on_event(event)
        except Exception:  # noqa: BLE001 - a receiver that is gone: stop working for it
            log.debug("job %s: event receiver failed; cancelling", job.id, exc_info=True)
            job.cancel()

    def _observe(self, job: Job, stats: GenerationStats) -> None:
        started = job.started_at or job.submitted_at
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - started)
        if self.metrics is not None:
            self.metrics.observe_generation(stats, queue_seconds=started - job.submitted_at)

    def _observe_experts(self, mark, decoded: int):
        """The step's expert figures for /metrics: cache deltas (the local cache or the nodes'), and
        on nodes each node's latencies and the layer dispatch times; return the new mark. A failure
        here (a bug in the figures) is logged, not fatal to serving."""
        now = self.streaming.backend.stats()
        if self.metrics is None:
            return now
        try:
            used = now.since(mark).total
            self.metrics.observe_cache(used.hits, used.misses, used.bytes_read)
            self.metrics.observe_batch(decoded)
            remote = self.streaming.remote
            if remote is not None:
                for node_id, traffic in remote.dispatch.nodes.items():
                    self.metrics.observe_node_latency(remote.links[node_id].label, traffic.latencies)
                self.metrics.observe_layer_dispatch(remote.dispatch.layer_seconds)
                remote.reset_dispatch()  # the per-call lists would otherwise grow for the server's life
        except Exception:
            log.exception("the expert figures of a step failed; serving goes on")
        return now
