"""Errors as each API shapes them: OpenAI's body everywhere, Anthropic's on /v1/messages; one line."""

from __future__ import annotations

import json

from flashmesh.coordinator.api.jobs import WorkerClosed
from flashmesh.protos.errors import UserError
from starlette.responses import JSONResponse

ANTHROPIC_PATHS = ("/v1/messages",)
# Anthropic's error types by HTTP status (its API reference).
ANTHROPIC_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error"}  # fmt: skip


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers


def unsupported(param: str, why: str) -> ApiError:
    """A parameter this server does not implement (at this value): refused by name, never ignored."""
    return ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str) -> dict:
    kind = ANTHROPIC_KINDS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def body_for(path: str, status: int, message: str, **kw) -> dict:
    if path.startswith(ANTHROPIC_PATHS):
        return anthropic_error_body(status, message)
    return error_body(message, **kw)


def error_response(path: str, status: int, message: str, *, headers: dict | None = None, **kw) -> JSONResponse:
    return JSONResponse(body_for(path, status, message, **kw), status_code=status, headers=headers)


def error_bytes(path: str, status: int, message: str, **kw) -> bytes:
    return json.dumps(body_for(path, status, message, **kw)).encode()


def generation_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, WorkerClosed):
        return ApiError(503, str(e), kind="server_error", code="shutting_down")
    if isinstance(e, UserError):  # a node or the store failed: the server cannot serve this now
        return ApiError(503, str(e), kind="server_error", code="experts_unavailable")
    return ApiError(500, f"generation failed: {e}", kind="server_error", code="generation_failed")
