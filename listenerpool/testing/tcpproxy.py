"""A fault-injecting TCP proxy for tests, e.g. between workers and Redis.

:class:`TCPProxy` listens on 127.0.0.1 and forwards every accepted connection to a target. Its
mode, switched at any time with :meth:`TCPProxy.set_mode`, applies to all connections:

- ``pass``: forward both ways.
- ``stall``: a network partition. Every connection stays open but nothing is forwarded in either
  direction; new connections are accepted but the target is not dialled. Bytes sent meanwhile
  are *held*, not dropped (the proxy stops reading, so TCP flow control holds them back). Back in
  ``pass`` they are delivered in order, like TCP after a healed partition, and a connection a
  side closed during the stall is closed then.
- ``cut``: every connection (stalled ones too) is closed at once, dropping held bytes, and new
  connections are accepted and closed at once while the mode lasts (a plain close: FIN, or RST
  where unread bytes are pending). On return from ``set_mode("cut")`` all of them are closed.

Either side's EOF or error closes both sides of that connection. The proxy runs its own event
loop in a daemon thread; every public method is thread-safe and takes effect before it returns.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Final, Literal

from listenerpool.testing.loopthread import BACKLOG, ThreadedServer

__all__ = ["Mode", "TCPProxy"]

Mode = Literal["pass", "stall", "cut"]
_READ_SIZE: Final = 256 * 1024


class _Link:
    """One proxied connection: the client's writer, the target's writer and the tasks."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        for writer in (self.client, self.target):
            if writer is not None:
                writer.transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class TCPProxy(ThreadedServer):
    """Forwards ``127.0.0.1:{port}`` to ``target_host:target_port`` with scripted faults.

    :meth:`start` binds and starts forwarding in a background thread (a restart binds the same
    port); :meth:`stop` closes the listener and every connection.
    """

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        super().__init__("127.0.0.1", listen_port)
        self.target_host = target_host
        self.target_port = target_port
        self._mode: Mode = "pass"
        self._lock = threading.Lock()
        self._count = 0
        self._links: set[_Link] = set()  # touched on the loop only
        self._passing: asyncio.Event | None = None  # set while the mode is "pass"

    @property
    def mode(self) -> Mode:
        return self._mode

    def connections(self) -> int:
        """Client connections open now (stalled and not yet forwarded ones included)."""
        with self._lock:
            return self._count

    # -- lifecycle ---------------------------------------------------------------------------
    async def _serve(self, sock: socket.socket) -> asyncio.Server:
        self._passing = asyncio.Event()
        if self._mode == "pass":
            self._passing.set()
        return await asyncio.start_server(
            self._handle, sock=sock, backlog=BACKLOG, limit=_READ_SIZE
        )

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._cut()
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports run connection_lost (socket close)

    # -- control -----------------------------------------------------------------------------
    def set_mode(self, mode: Mode) -> None:
        """Switch to ``pass``, ``stall`` or ``cut`` (see the module docstring)."""
        if mode not in ("pass", "stall", "cut"):
            raise ValueError(f"unknown mode {mode!r}")
        runner = self._runner
        if runner is None:
            self._mode = mode
        else:
            runner.run(self._switch(mode))

    async def _switch(self, mode: Mode) -> None:
        assert self._passing is not None
        self._mode = mode
        if mode == "pass":
            self._passing.set()
        else:
            self._passing.clear()
        if mode == "cut":
            await self._cut()

    async def _cut(self) -> None:
        """Close every connection and wait until their tasks are done."""
        tasks = [task for link in self._links for task in link.tasks]
        for link in list(self._links):
            link.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- forwarding (event loop thread only) -------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "cut":
            writer.transport.abort()
            return
        link = _Link(writer)
        task = asyncio.current_task()
        assert task is not None and self._passing is not None
        link.tasks.add(task)
        self._links.add(link)
        with self._lock:
            self._count += 1
        try:
            await self._passing.wait()
            target_reader, link.target = await asyncio.open_connection(
                self.target_host, self.target_port, limit=_READ_SIZE
            )
            pumps = {
                asyncio.create_task(self._pump(reader, link.target)),
                asyncio.create_task(self._pump(target_reader, writer)),
            }
            link.tasks |= pumps
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, asyncio.CancelledError):
            pass  # target refused, or cut/stop: the finally block closes both sides
        finally:
            link.close()
            self._links.discard(link)
            with self._lock:
                self._count -= 1

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        assert self._passing is not None
        while True:
            await self._passing.wait()
            try:
                data = await source.read(_READ_SIZE)
            except OSError:
                data = b""
            # What arrived while a stall began (bytes, EOF or reset) is held until it ends.
            await self._passing.wait()
            if not data:
                return
            sink.write(data)
            try:
                await sink.drain()
            except OSError:
                return
