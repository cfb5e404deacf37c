"""Event-loop plumbing shared by the test servers: a loop in a daemon thread, polling helpers,
listening sockets, and the start/stop/context-manager lifecycle of the servers built on them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from listenerpool.service import Service

__all__ = [
    "BACKLOG",
    "CALL_TIMEOUT",
    "LoopThread",
    "Service",
    "ThreadedServer",
    "await_until",
    "listen_socket",
    "wait_until",
]

T = TypeVar("T")

#: Seconds to wait for a call run on a :class:`LoopThread` (and for its thread to end).
CALL_TIMEOUT: Final = 10.0
BACKLOG: Final = 4096


def wait_until(predicate: Callable[[], bool], timeout: float, message: str = "") -> None:
    """Poll ``predicate`` every 10 ms; raise ``AssertionError(message)`` if still false after
    ``timeout`` seconds. Blocks the calling thread (use ``await_until`` inside an event loop)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(0.01)


async def await_until(
    predicate: Callable[[], bool],
    timeout: float,
    message: str = "",
) -> None:
    """Like :func:`wait_until` but sleeps with ``asyncio.sleep`` so the caller's loop keeps
    running (for async tests whose client lives on that loop)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def listen_socket(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket; binding here (not via ``loop.create_server(host)``)
    avoids getaddrinfo in the loop's executor thread and tells the port at once. Pass
    ``backlog=BACKLOG`` to ``create_server`` too: it calls ``listen()`` again (default 100)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LoopThread:
    """An asyncio event loop running forever in a daemon thread, until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        try:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop and return its result (directly if already on the loop)."""
        if self.in_loop():
            return fn()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(CALL_TIMEOUT)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT)

    def stop(self) -> None:
        """Stop the loop, wait for the thread to end and close the loop."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_TIMEOUT)


class ThreadedServer(Service):
    """A TCP server on ``host:port`` served by its own :class:`LoopThread`.

    Subclasses implement :meth:`_serve` (start serving the bound socket, on the loop) and
    :meth:`_shutdown` (close the server and its connections, on the loop). ``_runner`` is the
    loop thread while started (None otherwise); ``_server`` is what :meth:`_serve` returned.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._runner: LoopThread | None = None
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        """Bind and start serving in a background thread. Port 0 binds a free port and sets
        ``port`` to it, so a restart after :meth:`stop` binds the same port."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        sock = listen_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        runner = LoopThread(f"{type(self).__name__}:{self.port}")
        runner.start()
        try:
            self._server = runner.run(self._serve(sock))
        except BaseException:
            sock.close()
            runner.stop()
            raise
        self._runner = runner

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            runner.run(self._shutdown())
        finally:
            runner.stop()

    @abstractmethod
    async def _serve(self, sock: socket.socket) -> asyncio.Server:
        """Start serving the listening ``sock`` (pass ``backlog=BACKLOG``); runs on the loop."""

    @abstractmethod
    async def _shutdown(self) -> None:
        """Close ``_server`` and every connection; runs on the loop, before it stops."""
