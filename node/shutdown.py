"""Stopping cleanly: the one MLX thread of a process, and SIGTERM / SIGINT as a request to drain.

One-shot commands (run, demo, the benchmarks) stop at safe points: `interrupt` (their SIGTERM and
SIGINT handler) raises KeyboardInterrupt, except inside `stop_points()` blocks -- a generation --
where it only records the request, and the block stops between two tokens. An exception raised by
a signal handler lands wherever the main thread is: inside gRPC's channel machinery it can leave a
channel that never closes, inside a destructor it is swallowed and the work goes on.

Why threads that used MLX must release their MLX state before they end: MLX's Python binding keeps
a random key per thread (a C++ `thread_local` holding a Python list). Its destructor runs as the OS
thread exits -- after `Thread.join()` has already returned -- and takes the GIL. When the main
thread has meanwhile begun interpreter finalization, taking the GIL ends the thread with
`pthread_exit`, whose unwinding through that destructor calls std::terminate: the process aborts
("terminate called without an active exception", status 134). `mx.clear_streams()` (mlx >= 0.32.1)
drops that state while the interpreter is alive, so nothing is left for the destructor to do.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import mlx.core as mx


def release_thread_mlx_state() -> None:
    """The last MLX call of a thread that used MLX (see the module docstring)."""
    mx.clear_streams()


class MlxThread:
    """A single worker thread for every MLX operation of its owner; `shutdown` releases the
    thread's MLX state on that thread before it ends."""

    def __init__(self, name: str = "flashmesh-mlx") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        try:
            self._pool.submit(release_thread_mlx_state).result()
        except RuntimeError:  # already shut down
            pass
        self._pool.shutdown(wait=True)


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT while the block runs (the caller drains, then returns
    normally: exit status 0); the previous handlers come back afterwards. Main thread only."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_stop_requested = threading.Event()
_cooperating = 0  # stop_points() blocks open on any thread


def interrupt(_signum=None, _frame=None) -> None:
    """The SIGTERM / SIGINT handler of one-shot commands (see the module docstring)."""
    _stop_requested.set()  # kept even if the interrupt below is swallowed: the next stop point sees it
    if not _cooperating:
        raise KeyboardInterrupt


@contextmanager
def stop_points() -> Iterator[Callable[[], bool]]:
    """A block that asks the yielded `stopped()` at safe points instead of being interrupted; a stop
    requested during it raises KeyboardInterrupt when it ends."""
    global _cooperating
    _cooperating += 1
    try:
        yield _stop_requested.is_set
    finally:
        _cooperating -= 1
    if _stop_requested.is_set():
        raise KeyboardInterrupt
