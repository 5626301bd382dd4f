"""One request's generations (its choices: `n`, several prompts) submitted to the worker, their
events merged into this event loop. Every API (OpenAI chat and completions, Anthropic messages,
OpenAI responses) runs its request through a Run and only formats what comes out.

Events cross from the worker thread through loop.call_soon_threadsafe into an asyncio.Queue. A run
is cancelled however its response ends (done, client gone, server stopping).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from flashmesh.coordinator.api.errors import ApiError, generation_error
from flashmesh.coordinator.api.jobs import DoneEvent, ErrorEvent, Event, Job, QueueFull, WorkerClosed
from flashmesh.coordinator.api.worker import GenerationWorker
from flashmesh.coordinator.generate import SamplingParams
from starlette.requests import Request
from starlette.responses import StreamingResponse

KEEPALIVE_S = 5.0  # a stream sends a keep-alive this often while it waits: finds clients that left
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


@dataclass(frozen=True)
class Choice:
    prompt: list[int]
    params: SamplingParams
    logprobs: int | None = None  # None: off; else how many alternatives per token


class Run:
    """The jobs of one request; `events()` yields (choice index, event) until every choice is done."""

    def __init__(self, worker: GenerationWorker, choices: list[Choice]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.jobs: list[Job] = []
        self.started = time.time()
        try:
            for i, c in enumerate(choices):
                self.jobs.append(worker.submit(c.prompt, c.params, self._receiver(i), logprobs=c.logprobs))
        except QueueFull as e:
            self.cancel()
            raise ApiError(503, str(e), kind="server_busy", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None  # fmt: skip
        except WorkerClosed as e:
            self.cancel()
            raise ApiError(503, str(e), kind="server_error", code="shutting_down") from None

    @property
    def id(self) -> str:
        return self.jobs[0].id

    def _receiver(self, index: int):
        def receive(event: Event) -> None:  # on the worker thread; raises if the loop is gone (the job cancels)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return receive

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self, *, keepalive: float | None = None) -> AsyncIterator[tuple[int, Event] | None]:
        """Every event; None every `keepalive` seconds while nothing comes. An ErrorEvent raises its
        ApiError (the other choices are cancelled)."""
        remaining = len(self.jobs)
        while remaining:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), keepalive)
            except TimeoutError:
                yield None
                continue
            if isinstance(event, ErrorEvent):
                self.cancel()
                raise generation_error(event.error)
            if isinstance(event, DoneEvent):
                remaining -= 1
            yield index, event

    async def collect(self, request: Request) -> dict[int, tuple[list[Event], DoneEvent]] | None:
        """Every choice's events and its DoneEvent; None if the client left (the run is cancelled)."""
        out: dict[int, list[Event]] = {i: [] for i in range(len(self.jobs))}
        done: dict[int, DoneEvent] = {}
        checked = time.monotonic()
        try:
            async for item in self.events(keepalive=DISCONNECT_POLL_S):
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # tokens may keep coming: by the clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return None
                if item is None:
                    continue
                index, event = item
                if isinstance(event, DoneEvent):
                    done[index] = event
                else:
                    out[index].append(event)
        finally:
            self.cancel()  # a no-op when done; stops the work if this handler was cancelled
        return {i: (out[i], done[i]) for i in out}


class CancellingStream(StreamingResponse):
    """Server-sent events that cancel the run however the response ends."""

    def __init__(self, body: AsyncIterator[str], run: Run) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()
