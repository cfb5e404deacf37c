"""A loopback HTTP server that answers each request with the bytes a test scripts for its path.

Tests of the upstream client need answers no real server gives on purpose: a chunked body cut
short, a 1xx before the head, a redirect chain, a head dribbled byte by byte, garbage. Each
connection's request head is recorded; the connection stays open after the script unless the
script says to close it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

#: Writes one response: given the writer, sends bytes (and may pause); returns whether to close.
Script = Callable[[asyncio.StreamWriter], Awaitable[bool]]


def send(*parts: bytes, close: bool = False) -> Script:
    """A script writing ``parts`` at once, then keeping (or closing) the connection."""

    async def script(writer: asyncio.StreamWriter) -> bool:
        for part in parts:
            writer.write(part)
        await writer.drain()
        return close

    return script


@dataclass
class Request:
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass
class ScriptedServer:
    port: int = 0
    scripts: dict[str, Script] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    #: Set when a connection's peer has gone (EOF or reset), one per connection.
    closed: list[asyncio.Event] = field(default_factory=list)

    def url(self, path: str, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gone = asyncio.Event()
        self.closed.append(gone)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            headers = {}
            for item in fields:
                if item:
                    name, _, value = item.partition(":")
                    headers[name.strip().lower()] = value.strip()
            path = line.split(" ")[1]
            self.requests.append(Request(path, headers))
            script = self.scripts.get(path, send(b"HTTP/1.1 404 Not Found\r\n\r\n", close=True))
            if not await script(writer):
                while await reader.read(65536):
                    pass  # the client is not meant to send more: wait for its end
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            gone.set()
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def scripted_server(tls: ssl.SSLContext | None = None) -> AsyncIterator[ScriptedServer]:
    state = ScriptedServer()
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await state.serve(reader, writer)
        finally:
            handlers.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        await asyncio.wait_for(server.wait_closed(), 5)
