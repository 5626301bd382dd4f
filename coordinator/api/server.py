"""Running the app under uvicorn on a socket bound here, so a taken port is one clear error."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from flashmesh.protos.errors import UserError

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve --host {host!r} ({e.strerror}); pass an address such as 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "pick another --port (or 0 for any free one)" if e.errno in (98, 48) else "check --host and --port"
        raise UserError(f"cannot listen on {host} port {port}: {e.strerror}; {hint}") from None
    sock.set_inheritable(True)
    return sock


def make_server(app, *, log_level: str = "warning") -> uvicorn.Server:
    # timeout_graceful_shutdown: streams still open at shutdown are cut after this many seconds.
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5, lifespan="on")
    return uvicorn.Server(config)


@contextmanager
def serving_in_thread(app, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread (tests, benchmarks); yield its base URL."""
    sock = bind(host, port)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="flashmesh-http", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting")
            thread.join(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
