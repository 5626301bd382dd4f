"""The HTTP API over a started GenerationWorker: thin adapters that validate, tokenize on the
tokenizer thread, submit jobs and relay their events; they never touch MLX.

OpenAI's chat completions and completions (openai_routes.py), its Responses API
(responses_routes.py) and Anthropic's Messages API (anthropic_routes.py) share one model, one
worker and one way to run a request (runs.py). Errors are OpenAI's body, Anthropic's on /v1/messages.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from flashmesh.coordinator.api import anthropic_routes, openai_routes, responses_routes
from flashmesh.coordinator.api.context import ServeContext, ServeOptions
from flashmesh.coordinator.api.dashboard import add_dashboard
from flashmesh.coordinator.api.errors import ApiError, error_response
from flashmesh.coordinator.api.metrics import ServerMetrics
from flashmesh.coordinator.api.middleware import BodyLimit, RequestMetrics
from flashmesh.coordinator.api.parsing import validation_message
from flashmesh.coordinator.api.worker import GenerationWorker
from starlette.exceptions import HTTPException

__all__ = ["ApiError", "ServeOptions", "create_app"]

log = logging.getLogger(__name__)


def create_app(worker: GenerationWorker, options: ServeOptions, *, metrics: ServerMetrics | None = None) -> FastAPI:
    """The ASGI app over a started worker."""
    metrics = metrics or worker.metrics or ServerMetrics()
    metrics.watch_queue(lambda: worker.queue_depth)
    ctx = ServeContext(worker, options)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        ctx.thread.shutdown(wait=True)

    app = FastAPI(title="flashmesh", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e.status, str(e), kind=e.kind, param=e.param, code=e.code,
                              headers=e.headers)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return error_response(request.url.path, 400, message, param=param, code="invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error_response(request.url.path, e.status_code, str(e.detail),
                              code="not_found" if e.status_code == 404 else None,
                              headers=getattr(e, "headers", None))  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(request.url.path, 500, f"internal error: {type(e).__name__}", kind="server_error")

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
        ctx.check_model(model)
        return model_card()

    openai_routes.register(app, ctx)
    responses_routes.register(app, ctx)
    anthropic_routes.register(app, ctx)
    add_dashboard(app, worker, metrics, model_id=options.model_id)
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it sees 413s too
    return app
