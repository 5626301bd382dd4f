"""Pure ASGI middleware: a cap on request bodies (413) and request metrics by path and status."""

from __future__ import annotations

import time

from flashmesh.coordinator.api.errors import error_bytes
from flashmesh.coordinator.api.metrics import ServerMetrics

BODY_METHODS = {"POST", "PUT", "PATCH"}


async def _send_error(send, path: str, status: int, message: str, *, code: str) -> None:
    body = error_bytes(path, status, message, code=code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413 before any of it is parsed; the app gets the body
    already read, then the client's later messages (disconnects) as they come."""

    def __init__(self, app, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"the request body is over {self.max_bytes} bytes; send a smaller request"
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await _send_error(
                    send, scope["path"], 400, "Content-Length is not a number", code="bad_content_length"
                )
            if length > self.max_bytes:
                return await _send_error(send, scope["path"], 413, too_big, code="request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_error(send, scope["path"], 413, too_big, code="request_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestMetrics:
    """Count every answer by path and status; time it until its last byte (streams included)."""

    def __init__(self, app, *, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - start)
