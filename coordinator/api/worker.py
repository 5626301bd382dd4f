"""The one thread that does MLX work for the server, fed by a bounded queue.

Jobs are served one at a time, each with a fresh KV cache (mlx-lm's stream_generate makes one per
call), so concurrent requests never share a cache. Events reach the caller through `on_event`,
called on the worker thread; the HTTP layer forwards them to its event loop thread-safely. A job
whose `cancel()` is called stops at its next token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from flashmesh.coordinator.engine import StreamingModel
from flashmesh.coordinator.generate import GenerationStats
from flashmesh.coordinator.remote import RemoteExperts
from flashmesh.node.shutdown import release_thread_mlx_state
from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import UserError
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 1.0  # an idle worker probes cluster nodes that are down this often


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after_s: int) -> None:
        super().__init__(f"the server is busy ({depth} requests waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class WorkerClosed(Exception):
    pass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TextEvent:
    text: str  # new text since the last event (never part of a stop sequence)
    completion_tokens: int


@dataclass(frozen=True)
class DoneEvent:
    stats: GenerationStats  # finish_reason: "stop", "length" or "cancelled"


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


Event = TextEvent | DoneEvent | ErrorEvent


@dataclass(eq=False)
class Job:
    prompt_tokens: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    submitted_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


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


class GenerationWorker:
    """Opens the model on its own thread and serves jobs from a bounded queue, one at a time.

    `open_model` runs on the worker thread (all MLX work stays there) and returns the model and the
    cluster nodes it uses (empty when the experts run in this process)."""

    def __init__(
        self,
        open_model: Callable[[], tuple[StreamingModel, list]],
        *,
        max_queue: int = 16,
        prefill_step_size: int = 512,
        metrics=None,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._open_model = open_model
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self.prefill_step_size = prefill_step_size
        self.metrics = metrics
        self._thread = threading.Thread(target=self._run, name="flashmesh-mlx", daemon=True)
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._open_error: BaseException | None = None
        self._closing = threading.Event()
        self._running: Job | None = None
        self._seconds_per_job = 1.0  # moving average, for Retry-After
        self.streaming: StreamingModel | None = None
        self.nodes: list = []
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
        """Cancel the running job, fail the waiting ones, stop the thread, close the model."""
        self._closing.set()
        if self._running is not None:
            self._running.cancel()
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
        """Jobs waiting, plus the one running."""
        return self._queue.qsize() + (self._running is not None)

    # --- submitting ------------------------------------------------------------------------------
    def submit(self, prompt_tokens: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> Job:
        """Queue a generation; raise QueueFull when max_queue jobs already wait."""
        if self._closing.is_set() or self._finished.is_set():
            raise WorkerClosed("the server is shutting down")
        job = Job(list(prompt_tokens), params, on_event)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            depth = self._queue.qsize()
            raise QueueFull(depth, max(1, round(self._seconds_per_job * depth))) from None
        return job

    # --- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.streaming, self.nodes = self._open_model()
        except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
            self._open_error = e
            self._finish()
            return
        self._ready.set()
        try:
            while True:
                try:
                    job = self._queue.get(timeout=IDLE_POLL_SECONDS)
                except queue.Empty:
                    self._idle()
                    continue
                if job is None:
                    break
                self._running = job
                try:
                    self._serve(job)
                finally:
                    self._running = None
        finally:
            try:
                self.streaming.close()
            finally:
                self._finish()

    def _idle(self) -> None:
        """Between requests: probe cluster nodes that are down, so an idle server takes them back."""
        backend = self.streaming.backend
        if isinstance(backend, RemoteExperts):
            try:
                backend.poll_health()
            except UserError as e:  # a probe's trouble shows again on the next request
                log.warning("probing nodes: %s", e)

    def node_states(self) -> list[dict]:
        """Each cluster node's label and whether it is in use (a snapshot; empty in-process)."""
        backend = self.streaming.backend if self.streaming is not None else None
        if not isinstance(backend, RemoteExperts):
            return []
        states = backend.membership.states
        return [{"node": backend.links[n].label, "up": states[n].up, "reason": states[n].reason} for n in states]

    def _finish(self) -> None:
        release_thread_mlx_state()  # else the thread's end can race interpreter exit (node.shutdown)
        self._finished.set()
        self._ready.set()

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.on_event(event)
        except Exception:  # noqa: BLE001 - a receiver that is gone: stop working for it
            log.debug("job %s: event receiver failed; cancelling", job.id, exc_info=True)
            job.cancel()

    def _serve(self, job: Job) -> None:
        started = time.monotonic()
        before = self._counters()
        try:
            stats = self._generate(job)
        except Exception as e:  # noqa: BLE001 - reported to the job's client, the worker goes on
            log.warning("job %s failed: %s", job.id, e)
            if self.metrics is not None:
                self.metrics.observe_failure()
            self._send(job, ErrorEvent(e))
            return
        finally:
            self._record_counters(before)
            seconds = time.monotonic() - started
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * seconds
        if self.metrics is not None:
            self.metrics.observe_generation(stats, queue_seconds=started - job.submitted_at)
        self._send(job, DoneEvent(stats))

    def _generate(self, job: Job) -> GenerationStats:
        p = job.params
        streaming = self.streaming
        if p.seed is not None:
            mx.random.seed(p.seed)
        sampler = make_sampler(temp=p.temperature, top_p=p.top_p if p.top_p < 1.0 else 0.0)
        processors = make_logits_processors(
            logit_bias=dict(p.logit_bias) or None,
            presence_penalty=p.presence_penalty or None,
            frequency_penalty=p.frequency_penalty or None,
        )
        matcher = StopMatcher(p.stop)
        tokens: list[int] = []
        start = time.perf_counter()
        first_at = None
        finish = "cancelled" if job.cancelled else None
        if finish is None:
            for response in stream_generate(
                streaming.model,
                streaming.tokenizer,
                job.prompt_tokens,
                max_tokens=p.max_tokens,
                sampler=sampler,
                logits_processors=processors or None,
                prefill_step_size=self.prefill_step_size,
            ):
                first_at = first_at or time.perf_counter()
                tokens.append(int(response.token))
                text, stopped = matcher.feed(response.text)
                if text:
                    self._send(job, TextEvent(text, len(tokens)))
                if stopped:
                    finish = "stop"
                    break
                if response.finish_reason is not None:
                    finish = response.finish_reason
                    break
                if job.cancelled:
                    finish = "cancelled"
                    break
        if finish != "cancelled":
            rest = matcher.flush()  # text held back for a stop sequence that never came
            if rest:
                self._send(job, TextEvent(rest, len(tokens)))
        end = time.perf_counter()
        first_at = first_at or end
        decode = len(tokens) - 1
        return GenerationStats(
            tokens=tokens,
            text=matcher.text,
            prompt_tokens=len(job.prompt_tokens),
            ttft_s=first_at - start,
            decode_tokens_per_s=decode / (end - first_at) if decode > 0 and end > first_at else 0.0,
            finish_reason=finish,
        )

    # --- expert statistics for /metrics ----------------------------------------------------------
    def _counters(self) -> tuple[int, int, int]:
        """(hits, misses, bytes read) of the expert caches so far: the local one or the nodes'."""
        if self.streaming is not None and self.streaming.cache is not None:
            s = self.streaming.cache.stats
            return s.hits, s.misses, s.bytes_read
        hits = misses = read = 0
        for n in self.nodes:
            try:
                s = n.client.stats()
            except Exception as e:  # noqa: BLE001 - figures only; a node's failure shows in generation
                log.debug("stats from %s failed: %s", getattr(n, "node_id", n), e)
                continue
            hits, misses, read = hits + s.hits, misses + s.misses, read + s.bytes_read
        return hits, misses, read

    def _record_counters(self, before: tuple[int, int, int]) -> None:
        if self.metrics is None:
            return
        after = self._counters()
        self.metrics.observe_cache(*(max(0, a - b) for a, b in zip(after, before, strict=True)))
        backend = self.streaming.backend if self.streaming is not None else None
        stats = getattr(backend, "stats", None)
        if stats is not None and hasattr(backend, "reset_stats"):
            labels = {n: backend.links[n].label for n in stats.nodes} if hasattr(backend, "links") else {}
            for node_id, traffic in stats.nodes.items():
                self.metrics.observe_node_latency(labels.get(node_id, node_id), traffic.latencies)
            self.metrics.observe_layer_dispatch([c.seconds for c in stats.calls])
            backend.reset_stats()  # the per-call lists would otherwise grow for the server's life
