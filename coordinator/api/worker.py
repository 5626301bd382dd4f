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

from flashmesh.coordinator.engine import StreamingModel
from flashmesh.coordinator.generate import GenerationStats, SamplingParams, generate
from flashmesh.node.cache_stats import ExpertStats
from flashmesh.node.shutdown import release_thread_mlx_state
from flashmesh.node.store_format import Manifest
from flashmesh.protos.errors import UserError
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


class GenerationWorker:
    """Opens the model on its own thread and serves jobs from a bounded queue, one at a time.

    `open_model` runs on the worker thread (all MLX work stays there): `lambda: open_model(options)`
    (coordinator.engine), the same options `flashmesh run` takes."""

    def __init__(
        self,
        open_model: Callable[[], StreamingModel],
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
            self.streaming = self._open_model()
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
                except Exception as e:  # a bug after the generation (its figures): fail this job, keep serving
                    log.exception("job %s: failed after its generation", job.id)
                    self._send(job, ErrorEvent(e))
                finally:
                    self._running = None
        finally:
            try:
                self.streaming.close()
            finally:
                self._finish()

    def _idle(self) -> None:
        """Between requests: probe cluster nodes that are down, so an idle server takes them back."""
        remote = self.streaming.remote
        if remote is not None:
            try:
                remote.poll_health()
            except UserError as e:  # a probe's trouble shows again on the next request
                log.warning("probing nodes: %s", e)

    def node_states(self) -> list[dict]:
        """Each cluster node's label and whether it is in use (a snapshot; empty in-process)."""
        remote = self.streaming.remote if self.streaming is not None else None
        if remote is None:
            return []
        states = remote.membership.states
        return [{"node": remote.links[n].label, "up": states[n].up, "reason": states[n].reason} for n in states]

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
        before = self.streaming.backend.stats()
        try:
            stats = generate(
                self.streaming.model,
                self.streaming.tokenizer,
                job.prompt_tokens,
                job.params,
                prefill_step_size=self.prefill_step_size,
                on_text=lambda text, tokens: self._send(job, TextEvent(text, tokens)),
                cancelled=lambda: job.cancelled,
            )
        except Exception as e:  # noqa: BLE001 - reported to the job's client, the worker goes on
            log.warning("job %s failed: %s", job.id, e)
            if self.metrics is not None:
                self.metrics.observe_failure()
            self._send(job, ErrorEvent(e))
            return
        finally:
            self._observe_experts(before)
            seconds = time.monotonic() - started
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * seconds
        if self.metrics is not None:
            self.metrics.observe_generation(stats, queue_seconds=started - job.submitted_at)
        self._send(job, DoneEvent(stats))

    def _observe_experts(self, before: ExpertStats) -> None:
        """The job's expert figures for /metrics: cache deltas (the local cache or the nodes'), and on
        nodes each node's latencies and the layer dispatch times."""
        if self.metrics is None:
            return
        used = self.streaming.backend.stats().since(before).total
        self.metrics.observe_cache(used.hits, used.misses, used.bytes_read)
        remote = self.streaming.remote
        if remote is not None:
            for node_id, traffic in remote.dispatch.nodes.items():
                self.metrics.observe_node_latency(remote.links[node_id].label, traffic.latencies)
            self.metrics.observe_layer_dispatch(remote.dispatch.layer_seconds)
            remote.reset_dispatch()  # the per-call lists would otherwise grow for the server's life
