"""The OpenAI-compatible routes: thin adapters from HTTP to the GenerationWorker.

A handler validates (schemas.py), tokenizes on the tokenizer thread, submits a job and relays its
events; it never touches MLX. Events cross from the worker thread to this event loop through
loop.call_soon_threadsafe into an asyncio.Queue. A stream whose client leaves cancels its job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from flashmesh.coordinator.api.dashboard import add_dashboard
from flashmesh.coordinator.api.metrics import ServerMetrics
from flashmesh.coordinator.api.middleware import BodyLimit, RequestMetrics
from flashmesh.coordinator.api.openai_format import Reply, error_body, sse
from flashmesh.coordinator.api.schemas import ChatCompletionRequest, CompletionRequest, Sampling
from flashmesh.coordinator.api.worker import (
    DoneEvent,
    ErrorEvent,
    GenerationWorker,
    Job,
    QueueFull,
    TextEvent,
    WorkerClosed,
)
from flashmesh.coordinator.generate import SamplingParams
from flashmesh.protos.errors import UserError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)
S = TypeVar("S", bound=BaseModel)

KEEPALIVE_S = 5.0  # an SSE comment this often while a stream waits: finds clients that left
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers


@dataclass(frozen=True)
class ServeOptions:
    model_id: str
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    max_body_bytes: int = 8 * 2**20
    context_length: int | None = None  # prompt + completion tokens; default: the model's config


def _json_error(status: int, message: str, **kw) -> JSONResponse:
    headers = kw.pop("headers", None)
    return JSONResponse(error_body(message, **kw), status_code=status, headers=headers)


class _Bridge:
    """Worker-thread events into this loop's queue."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

    def __call__(self, event) -> None:  # on the worker thread; raises if the loop is gone (job cancels)
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _CancellingStream(StreamingResponse):
    """Cancel the job however the response ends: done, client gone, or server stopping."""

    def __init__(self, body: AsyncIterator[str], job: Job) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def create_app(worker: GenerationWorker, options: ServeOptions, *, metrics: ServerMetrics | None = None) -> FastAPI:
    """The ASGI app over a started worker."""
    metrics = metrics or worker.metrics or ServerMetrics()
    metrics.watch_queue(lambda: worker.queue_depth)
    tokenizer = worker.tokenizer
    config = worker.manifest.config
    vocab_size = int(config.get("vocab_size") or len(tokenizer.get_vocab()))
    context = options.context_length or int(config.get("max_position_embeddings") or 4096)
    tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashmesh-tokenizer")

    @asynccontextmanager
    async def lifespan(_app):
        yield
        tokenizer_thread.shutdown(wait=True)

    app = FastAPI(title="flashmesh", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return _json_error(e.status, str(e), kind=e.kind, param=e.param, code=e.code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        if first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        else:
            message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        return _json_error(400, message, param=param, code="invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return _json_error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None,
                           headers=getattr(e, "headers", None))  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(_request, e: Exception):
        log.exception("unexpected error")
        return _json_error(500, f"internal error: {type(e).__name__}", kind="server_error")

    def model_card() -> dict:
        return {"id": options.model_id, "object": "model", "created": int(worker.started_at), "owned_by": "flashmesh"}

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": options.model_id,
            "queue_depth": worker.queue_depth,
            "nodes": worker.node_states(),
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        _check_model(model)
        return model_card()

    def _check_model(name: str) -> None:
        if name != options.model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {options.model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def _params(body: Sampling, prompt_len: int, requested: int | None) -> SamplingParams:
        room = context - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's context is {context}",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")  # fmt: skip
        max_tokens = requested if requested is not None else min(room, options.max_tokens_limit)
        if max_tokens > min(room, options.max_tokens_limit):
            raise ApiError(400, f"max_tokens is {max_tokens}; at most {min(room, options.max_tokens_limit)} here "
                           f"(server limit {options.max_tokens_limit}, context {context} - prompt {prompt_len})",
                           param="max_tokens", code="max_tokens_too_large")  # fmt: skip
        bad = [t for t in body.logit_bias or {} if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"logit_bias names token {bad[0]}, outside the vocabulary (0..{vocab_size - 1})",
                           param="logit_bias")  # fmt: skip
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=tuple(body.stops),
            seed=body.seed, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=tuple(sorted((body.logit_bias or {}).items())),
        )  # fmt: skip

    async def _tokenize(fn, *args) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(tokenizer_thread, fn, *args)

    def _encode_completion(prompt) -> list[int]:
        if isinstance(prompt, str):
            try:
                return tokenizer.encode(prompt)
            except Exception as e:  # noqa: BLE001 - e.g. lone surrogates, which tokenizers refuse
                raise ApiError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from None
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", param="prompt")
        return list(prompt)

    def _encode_chat(messages: list[dict]) -> list[int]:
        if tokenizer.chat_template is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions", code="no_chat_template")
        try:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template refused these messages (jinja raises its own types)
            raise ApiError(400, f"the chat template refused the messages: {e}", param="messages") from None
        return list(out["input_ids"] if isinstance(out, dict) else out)

    async def _run(request: Request, body: Sampling, prompt: list[int], requested: int | None, *, chat: bool):
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        params = _params(body, len(prompt), requested)
        bridge = _Bridge()
        try:
            job = worker.submit(prompt, params, bridge)
        except QueueFull as e:
            raise ApiError(503, str(e), kind="server_busy", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None  # fmt: skip
        except WorkerClosed as e:
            raise ApiError(503, str(e), kind="server_error", code="shutting_down") from None
        reply = Reply(chat=chat, model=options.model_id, job_id=job.id, token_ids=body.return_token_ids)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _CancellingStream(_stream(bridge, reply, include_usage=include_usage), job)
        try:
            return await _collect(request, bridge, job, reply)
        finally:
            job.cancel()  # a no-op when done; stops the work if this handler was cancelled

    async def _collect(request: Request, bridge: _Bridge, job: Job, reply: Reply) -> dict:
        checked = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(bridge.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # tokens may keep coming: check by the clock
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    return {}
            if isinstance(event, DoneEvent):
                return reply.complete(event.stats)
            if isinstance(event, ErrorEvent):
                raise _generation_error(event.error)

    async def _stream(bridge: _Bridge, reply: Reply, *, include_usage: bool) -> AsyncIterator[str]:
        if reply.chat:
            yield sse(reply.chunk(None, role=True))
        while True:
            try:
                event = await asyncio.wait_for(bridge.events.get(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if isinstance(event, TextEvent):
                yield sse(reply.chunk(event.text))
            elif isinstance(event, DoneEvent):
                for chunk in reply.final_chunks(event.stats, include_usage=include_usage):
                    yield sse(chunk)
                break
            else:
                e = _generation_error(event.error)
                yield sse(error_body(str(e), kind=e.kind, code=e.code))
                break
        yield sse("[DONE]")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        _check_model(body.model)
        prompt = await _tokenize(_encode_completion, body.prompt)
        # OpenAI's default for completions is 16 tokens (chat: as many as fit).
        requested = body.max_tokens if body.max_tokens is not None else min(16, options.max_tokens_limit)
        return await _run(request, body, prompt, requested, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        _check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = await _tokenize(_encode_chat, messages)
        return await _run(request, body, prompt, body.token_limit, chat=True)

    add_dashboard(app, worker, metrics, model_id=options.model_id)
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it sees 413s too
    return app


async def _parse(request: Request, model: type[S]) -> S:
    """The body as JSON, whatever its Content-Type says (curl -d sends form encoding), then validated."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON ({str(e)[:200]})", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None


def _generation_error(e: BaseException) -> ApiError:
    if isinstance(e, WorkerClosed):
        return ApiError(503, str(e), kind="server_error", code="shutting_down")
    if isinstance(e, UserError):  # a node or the store failed: the server cannot serve this now
        return ApiError(503, str(e), kind="server_error", code="experts_unavailable")
    return ApiError(500, f"generation failed: {e}", kind="server_error", code="generation_failed")
