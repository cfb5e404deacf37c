"""A scriptable upstream SSE server for integration tests, benchmarks and chaos runs.

:class:`SSEUpstream` is a real HTTP/1.1 server on 127.0.0.1 that serves ``GET /events/{sid}`` as
``text/event-stream`` with ``Connection: close`` semantics (no chunked encoding; a finite body
ends when the server closes). Each connection emits numbered events ``last+1, last+2, ...`` where
``last`` is the integer in the request's ``Last-Event-ID`` header (0 if absent or invalid)::

    id: {n}\\nevent: {type}\\ndata: {payload}\\n\\n

and ``: heartbeat\\n\\n`` comments every ``heartbeat`` seconds while idle. Faults are scripted per
session with :meth:`SSEUpstream.configure` and observed with :meth:`SSEUpstream.stats`.

The server runs its own event loop in a daemon thread, so sync tests, async tests and other event
loops can all use it; every public method is thread-safe. One protocol object and one task per
connection (no thread), so it holds thousands of idle connections.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from http import HTTPStatus
from typing import Final
from urllib.parse import quote, unquote, urlsplit

from listenerpool.testing.loopthread import (
    BACKLOG,
    CALL_TIMEOUT,
    LoopThread,
    ThreadedServer,
    await_until,
    listen_socket,
    wait_until,
)

__all__ = [
    "BACKLOG",
    "EVENT_TYPES",
    "ConnectionRecord",
    "LoopThread",
    "SSEUpstream",
    "UpstreamStats",
    "await_until",
    "listen_socket",
    "wait_until",
]

#: AG-UI event names; event ``n`` has type ``EVENT_TYPES[(n - 1) % len(EVENT_TYPES)]``.
EVENT_TYPES: Final = (
    "TEXT_MESSAGE_START",
    "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_END",
    "TOOL_CALL_START",
    "TOOL_CALL_ARGS",
    "TOOL_CALL_END",
    "STATE_DELTA",
)
_MODES: Final = frozenset(
    {
        "normal",
        "stall",
        "vanish",
        "garbage",
        "oversized",
        "huge_event",
        "slow_head",
        "invalid_utf8",
        "wrong_type",
    }
)
_HEARTBEAT: Final = b": heartbeat\n\n"
_SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Connection: close\r\n\r\n"
)
_MAX_HEAD: Final = 64 * 1024
_GARBAGE_CHUNK: Final = 512
_GARBAGE_INTERVAL: Final = 0.125  # 512 B every 125 ms = 4 KiB/s
_WRITE_CHUNK: Final = 64 * 1024
_YIELD_EVERY: Final = 64  # rate=0 streams yield to the loop this often
_SLOW_HEAD_INTERVAL: Final = 0.1  # slow_head: one byte of the response head this often
_HUGE_EVENT_LINE: Final = b"data: " + b"y" * 1018 + b"\n"  # 1 KiB per data line


@dataclass(frozen=True)
class ConnectionRecord:
    """One routed connection of a session: when it was open (``time.monotonic()``; ``closed``
    is None while it is open), the client's port, and the event numbers written on it
    (``first``..``last``, consecutive; ``first`` is None when it wrote no event)."""

    opened: float
    closed: float | None
    peer_port: int
    last_event_id: str | None
    first: int | None
    last: int | None


@dataclass(frozen=True)
class UpstreamStats:
    """A snapshot of one session's connections (header names in ``request_headers`` are
    lower-case; ``disconnects`` holds ``time.monotonic()`` values of client-side closes only;
    ``connections`` has one record per routed connection, in arrival order)."""

    connections_total: int = 0
    concurrent: int = 0
    max_concurrent: int = 0
    last_event_ids: list[str | None] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)
    highest_emitted: int = 0
    request_headers: list[dict[str, str]] = field(default_factory=list)
    connections: list[ConnectionRecord] = field(default_factory=list)


@dataclass(frozen=True)
class _Config:
    rate: float
    total: int | None
    heartbeat: float
    mode: str

    @property
    def status(self) -> int | None:
        return int(self.mode[7:]) if self.mode.startswith("status:") else None

    @property
    def location(self) -> str | None:
        return self.mode[9:] if self.mode.startswith("redirect:") else None


class _Keep(Enum):
    KEEP = "keep"


_KEEP: Final = _Keep.KEEP


class _Session:
    """Config and counters of one session id; counters are guarded by ``SSEUpstream._lock``."""

    def __init__(self, config: _Config) -> None:
        self.config = config
        self.conns: set[_Conn] = set()  # routed and open, i.e. counted as concurrent
        self.connections_total = 0
        self.max_concurrent = 0
        self.last_event_ids: list[str | None] = []
        self.disconnects: list[float] = []
        self.highest_emitted = 0
        self.request_headers: list[dict[str, str]] = []
        self.scripted: deque[bytes] = deque()  # events queued by SSEUpstream.send, in order
        self.records: list[_Record] = []


class _Record:
    """The mutable form of :class:`ConnectionRecord`, guarded by ``SSEUpstream._lock``."""

    __slots__ = ("closed", "first", "last", "last_event_id", "opened", "peer_port")

    def __init__(self, opened: float, peer_port: int, last_event_id: str | None) -> None:
        self.opened = opened
        self.closed: float | None = None
        self.peer_port = peer_port
        self.last_event_id = last_event_id
        self.first: int | None = None
        self.last: int | None = None

    def freeze(self) -> ConnectionRecord:
        return ConnectionRecord(
            self.opened, self.closed, self.peer_port, self.last_event_id, self.first, self.last
        )


class _Conn(asyncio.Protocol):
    """One accepted connection: parses the request head, then one task writes the response.

    Reading never pauses, so a client's FIN or RST is seen at once (``eof_received`` /
    ``connection_lost``), whatever the writer is doing.
    """

    __slots__ = (
        "_drain",
        "_head",
        "_server",
        "_sleeper",
        "done",
        "record",
        "session",
        "task",
        "transport",
        "vanished",
        "writing_paused",
    )

    def __init__(self, server: SSEUpstream) -> None:
        self._server = server
        self._head = bytearray()
        self._drain: asyncio.Future[None] | None = None
        self._sleeper: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.session: _Session | None = None
        self.record: _Record | None = None
        self.task: asyncio.Task[None] | None = None
        self.done = False  # no more writes: either side closed
        self.vanished = False
        self.writing_paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._server._conns.add(self)
        if self._server._stopping:
            # Accepted just before the listener closed, set up after the stop took its list of
            # connections: nothing else would close it, and a reader would keep it open.
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.session is not None or self.done:
            return  # a GET has no body; whatever else the client sends is ignored
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > _MAX_HEAD:
                self.finish(_response(431, "request head too large"))
            return
        self._server._route(self, bytes(self._head[:end]))
        self._head = bytearray()

    def eof_received(self) -> bool:
        self._client_closed()
        return True  # keep the transport; vanished connections stay open until stop()

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_closed()
        self._server._conns.discard(self)
        if not self._server._conns and self._server._all_closed is not None:
            self._server._all_closed.set()
        self.wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- closing ------------------------------------------------------------------------------
    def _client_closed(self) -> None:
        if self.done:
            return
        self.done = True
        self._server._forget(self, client_closed=True)
        self.wake()
        if not self.vanished and self.transport is not None:
            self.transport.abort()

    def close_by_server(self) -> None:
        """Close now, discarding unsent bytes (FIN, not RST: nothing unread is left)."""
        if not self.done:
            self.done = True
            self._server._forget(self, client_closed=False)
            self.wake()
        if self.transport is not None:
            self.transport.abort()

    def finish(self, response: bytes) -> None:
        """Write a complete finite response and close after it is flushed."""
        if self.done or self.transport is None:
            return
        self.done = True
        self._server._forget(self, client_closed=False)
        self.transport.write(response)
        self.transport.close()

    # -- writing helpers ---------------------------------------------------------------------
    def wake(self) -> None:
        if self._sleeper is not None and not self._sleeper.done():
            self._sleeper.set_result(None)

    async def sleep(self, delay: float | None) -> None:
        """Sleep ``delay`` seconds (forever if None) or until :meth:`wake`."""
        loop = asyncio.get_running_loop()
        self._sleeper = fut = loop.create_future()
        handle = None if delay is None else loop.call_later(max(delay, 0.0), _resolve, fut)
        try:
            await fut
        finally:
            self._sleeper = None
            if handle is not None:
                handle.cancel()

    async def send(self, data: bytes) -> bool:
        """Write ``data`` and wait while the transport's buffer is full; False once closed."""
        if self.done or self.transport is None:
            return False
        self.transport.write(data)
        return await self.drain()

    async def drain(self) -> bool:
        if self.writing_paused and not self.done:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None
        return not self.done

    async def gate(self) -> bool:
        """Wait while the session is stalled; False if this connection must not write again."""
        while not self.done and self.session is not None:
            config = self.session.config
            if config.mode == "vanish":
                self.vanished = True
                return False
            if config.status is not None:
                self.close_by_server()
                return False
            if config.mode != "stall":
                return True
            await self.sleep(None)
        return False


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _response(status: int, body: str, content_type: str = "application/json") -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Status"
    if content_type == "application/json":
        body = json.dumps({"error": body, "status": status})
    data = body.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + data


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            return None
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return parts[0], parts[1], headers


def _garbage(rng: random.Random, size: int) -> bytes:
    """Random bytes with invalid UTF-8 and NULs but no CR and no blank line (no LF at the
    start, no two LFs in a row), so an event-stream parser never dispatches anything."""
    data = bytearray(b"\xff\x00" + rng.randbytes(size - 2))
    for i, byte in enumerate(data):
        if byte == 0x0D or (byte == 0x0A and (i == 0 or data[i - 1] == 0x0A)):
            data[i] = 0x00
    return bytes(data)


class SSEUpstream(ThreadedServer):
    """An upstream SSE server, scriptable per session.

    Defaults for every session come from the constructor: ``rate`` events per second per
    connection (0 = as fast as the socket takes them), ``total`` = last event number to emit
    (afterwards only heartbeats: a finished runner; None = endless), ``heartbeat`` seconds of
    idleness between ``: heartbeat`` comments (0 = none). :meth:`configure` overrides them and
    sets a fault ``mode`` per session:

    - ``normal``
    - ``stall``: open connections stop writing anything (no heartbeats) but stay open; new ones
      get the 200 head, then silence. Switching back resumes the event stream on them.
    - ``vanish``: a peer that died without a FIN: no more writes, never closed until :meth:`stop`
      (bytes already handed to the kernel still arrive). New connections get no answer at all.
      A client's own close is still observed and recorded, which the client cannot tell apart.
    - ``status:NNN``: new connections get that status with a small JSON body and are closed;
      open ones are closed.
    - ``garbage``: 200 ``text/event-stream``, then ~4 KiB/s of random bytes with NULs and invalid
      UTF-8, no CR and no blank line.
    - ``oversized``: 200, then ``data: `` and ``oversized_bytes`` of ``x`` with no newline; then
      silence.
    - ``huge_event``: 200, then one event of ``oversized_bytes`` of data in 1 KiB ``data:``
      lines, then the blank line that would dispatch it; then silence.
    - ``slow_head``: the 200 event-stream head dribbled one byte every 0.1 s (a slowloris
      response), then the normal event stream.
    - ``redirect:<url>``: new connections get ``302 Found`` with ``Location: <url>`` and are
      closed (``<url>`` may be this session's own URL: a redirect loop).
    - ``invalid_utf8``: normal numbered events whose data has the bytes ``ff fe`` added at the
      start of the JSON string ``delta``, so :meth:`number_of` still works after a lossy decode.
    - ``wrong_type``: 200 ``text/html`` with an HTML body, then close.

    The head of a response (status, garbage, oversized, HTML or event stream) is chosen when the
    request arrives; stall, vanish, status and the rate/total/heartbeat values also act on open
    connections. Restarting after :meth:`stop` binds the same port and keeps configs and stats.
    """

    def __init__(
        self,
        *,
        rate: float = 20.0,
        total: int | None = None,
        heartbeat: float = 15.0,
        payload_bytes: int = 160,
        oversized_bytes: int = 2 * 1024 * 1024,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._defaults = _check(_Config(rate, total, heartbeat, "normal"))
        if payload_bytes < 0 or oversized_bytes < 0:
            raise ValueError("payload_bytes and oversized_bytes must be >= 0")
        self.payload_bytes = payload_bytes
        self.oversized_bytes = oversized_bytes
        super().__init__(host, port)
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._conns: set[_Conn] = set()  # every open transport; touched on the loop only
        self._all_closed: asyncio.Event | None = None  # set by the last connection_lost at stop
        self._stopping = False  # set when the stop begins: a connection made later is aborted
        self._seed = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def _serve(self, sock: socket.socket) -> asyncio.Server:
        self._stopping = False
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Conn(self), sock=sock, backlog=BACKLOG)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._stopping = True
        self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.close_by_server()
        tasks = [conn.task for conn in conns if conn.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        if self._conns:  # each socket is closed by its connection_lost callback
            self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), CALL_TIMEOUT / 2)
            except TimeoutError:
                routed = sum(conn.session is not None for conn in self._conns)
                raise TimeoutError(
                    f"{len(self._conns)} connections ({routed} serving a session) still open "
                    f"{CALL_TIMEOUT / 2:g}s after the stop aborted them"
                ) from None

    # -- control -----------------------------------------------------------------------------
    def url(self, sid: str) -> str:
        return f"http://{self.host}:{self.port}/events/{quote(sid, safe='')}"

    def configure(
        self,
        sid: str,
        *,
        rate: float | _Keep = _KEEP,
        total: int | _Keep | None = _KEEP,
        heartbeat: float | _Keep = _KEEP,
        mode: str | _Keep = _KEEP,
    ) -> None:
        """Override settings of one session; unnamed settings keep their current value.

        Takes effect for new connections on return, and on open connections as described in the
        class docstring (status closes them before this returns)."""
        with self._lock:
            session = self._session(sid)
            config = session.config
            session.config = _check(
                replace(
                    config,
                    rate=config.rate if rate is _KEEP else rate,
                    total=config.total if total is _KEEP else total,
                    heartbeat=config.heartbeat if heartbeat is _KEEP else heartbeat,
                    mode=config.mode if mode is _KEEP else mode,
                )
            )
        self._on_loop(lambda: self._apply(session))

    def reset(self, sid: str) -> None:
        """Back to the constructor's defaults (stats are kept); stalled connections resume."""
        with self._lock:
            session = self._session(sid)
            session.config = self._defaults
        self._on_loop(lambda: self._apply(session))

    # -- scripting -----------------------------------------------------------------------------
    def send(self, sid: str, data: str, *, event: str | None = None, id: str | None = None) -> None:
        """Queue one event for ``sid``. It is written to the session's open connection, or to
        the next one if none is open, once (a connection closed before writing it leaves it
        queued for the next). Queued events come before the numbered ones; a server built with
        ``total=0`` sends only these. ``data`` may hold newlines (one ``data:`` line each)."""
        if any(ch in (event or "") + (id or "") for ch in "\r\n"):
            raise ValueError("event and id must not contain line breaks")
        lines = [f"id: {id}"] if id is not None else []
        if event is not None:
            lines.append(f"event: {event}")
        lines += [f"data: {line}" for line in data.replace("\r\n", "\n").split("\n")]
        frame = ("\n".join(lines) + "\n\n").encode()
        with self._lock:
            session = self._session(sid)
            session.scripted.append(frame)
        self._on_loop(lambda: self._apply(session))

    def close(self, sid: str) -> None:
        """End the session's open connections cleanly (same as :meth:`drop`): the client sees
        the stream end and reconnects with ``Last-Event-ID``."""
        self.drop(sid)

    def fail(self, sid: str, status: int) -> None:
        """Answer ``status`` to the session from now on (open connections are closed first);
        :meth:`reset` recovers. 4xx other than 408/429 makes a reader give up for good."""
        self.configure(sid, mode=f"status:{status}")

    def queued(self, sid: str) -> int:
        """Events queued with :meth:`send` and not yet written."""
        with self._lock:
            session = self._sessions.get(sid)
            return len(session.scripted) if session is not None else 0

    def drop(self, sid: str) -> None:
        """Close the session's open connections now, mid-stream (FIN, no final event)."""
        with self._lock:
            session = self._sessions.get(sid)
        if session is not None:
            self._on_loop(lambda: self._close_all(session))

    def finish_all(self) -> dict[str, int]:
        """End every session's stream where it is now: each session's ``total`` becomes its
        highest emitted number, atomically with respect to the writers (it runs on the
        server's loop). Returns those numbers by session id. Readers that resume later get the
        missing events and then heartbeats only."""
        runner = self._runner
        if runner is None:
            raise RuntimeError("the upstream is not running")
        return runner.call(self._finish_all)

    def _finish_all(self) -> dict[str, int]:
        with self._lock:
            for session in self._sessions.values():
                session.config = replace(session.config, total=session.highest_emitted)
            return {sid: s.highest_emitted for sid, s in self._sessions.items()}

    def _on_loop(self, fn: Callable[[], None]) -> None:
        runner = self._runner
        if runner is not None:
            runner.call(fn)

    def _apply(self, session: _Session) -> None:
        if session.config.status is not None:
            self._close_all(session)
        for conn in list(session.conns):
            conn.wake()

    def _close_all(self, session: _Session) -> None:
        for conn in list(session.conns):
            conn.close_by_server()

    # -- observation -------------------------------------------------------------------------
    def stats(self, sid: str) -> UpstreamStats:
        """A snapshot of the session's counters (all zero for a session never seen)."""
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return UpstreamStats()
            return UpstreamStats(
                connections_total=s.connections_total,
                concurrent=len(s.conns),
                max_concurrent=s.max_concurrent,
                last_event_ids=list(s.last_event_ids),
                disconnects=list(s.disconnects),
                highest_emitted=s.highest_emitted,
                request_headers=[dict(h) for h in s.request_headers],
                connections=[r.freeze() for r in s.records],
            )

    def sessions(self) -> list[str]:
        """Session ids that received at least one request, in first-seen order."""
        with self._lock:
            return [sid for sid, s in self._sessions.items() if s.connections_total]

    def total_concurrent(self) -> int:
        """Open session connections over all sessions (vanished ones included)."""
        with self._lock:
            return sum(len(s.conns) for s in self._sessions.values())

    def wait_until(self, predicate: Callable[[], bool], timeout: float, message: str = "") -> None:
        """See the module-level :func:`wait_until`."""
        wait_until(predicate, timeout, message)

    # -- payloads ----------------------------------------------------------------------------
    @staticmethod
    def event_type(n: int) -> str:
        return EVENT_TYPES[(n - 1) % len(EVENT_TYPES)]

    def payload(self, n: int) -> str:
        """The data of event ``n``: deterministic JSON of about ``payload_bytes`` bytes."""
        head = f'{{"type": "{self.event_type(n)}", "n": {n}, "delta": "'
        size = max(self.payload_bytes - len(head) - 2, 0)
        letters = "abcdefghijklmnopqrstuvwxyz"
        pad = (letters * (size // 26 + 2))[n % 26 : n % 26 + size]
        return f'{head}{pad}"}}'

    @staticmethod
    def number_of(data: str) -> int:
        """The event number inside a payload made by :meth:`payload`."""
        n = json.loads(data).get("n")
        if not isinstance(n, int):
            raise ValueError(f"no event number in {data[:80]!r}")
        return n

    def _event(self, n: int, invalid_utf8: bool) -> bytes:
        data = self.payload(n).encode()
        if invalid_utf8:
            at = data.index(b'"delta": "') + len(b'"delta": "')
            data = data[:at] + b"\xff\xfe" + data[at:]
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (n, self.event_type(n).encode(), data)

    # -- serving (event loop thread only) ----------------------------------------------------
    def _session(self, sid: str) -> _Session:
        session = self._sessions.get(sid)
        if session is None:
            session = self._sessions[sid] = _Session(self._defaults)
        return session

    def _forget(self, conn: _Conn, *, client_closed: bool) -> None:
        session = conn.session
        if session is None:
            return
        with self._lock:
            if conn in session.conns:
                session.conns.discard(conn)
                now = time.monotonic()
                if conn.record is not None:
                    conn.record.closed = now
                if client_closed:
                    session.disconnects.append(now)

    def _route(self, conn: _Conn, head: bytes) -> None:
        request = _parse_head(head)
        if request is None:
            conn.finish(_response(400, "bad request"))
            return
        method, target, headers = request
        path = urlsplit(target).path
        sid = unquote(path[len("/events/") :]) if path.startswith("/events/") else ""
        if not sid or "/" in sid:
            conn.finish(_response(404, "not found"))
            return
        if method != "GET":
            conn.finish(_response(405, "method not allowed"))
            return
        last_event_id = headers.get("last-event-id")
        peer = conn.transport.get_extra_info("peername") if conn.transport else None
        record = _Record(time.monotonic(), int(peer[1]) if peer else 0, last_event_id)
        conn.record = record
        with self._lock:
            session = self._session(sid)
            session.records.append(record)
            session.connections_total += 1
            session.conns.add(conn)
            session.max_concurrent = max(session.max_concurrent, len(session.conns))
            session.last_event_ids.append(last_event_id)
            session.request_headers.append(headers)
        conn.session = session
        config = session.config
        if config.status is not None:
            conn.finish(_response(config.status, f"scripted status {config.status}"))
        elif config.location is not None:
            conn.finish(_redirect(config.location))
        elif config.mode == "wrong_type":
            html = "<!doctype html><html><body><h1>Not an event stream</h1></body></html>"
            conn.finish(_response(200, html, "text/html; charset=utf-8"))
        elif config.mode == "vanish":
            conn.vanished = True
        else:
            self._seed += 1
            respond = self._respond(conn, config.mode, _last_id(last_event_id), self._seed)
            conn.task = asyncio.get_running_loop().create_task(respond)

    async def _respond(self, conn: _Conn, mode: str, last: int, seed: int) -> None:
        try:
            if mode == "slow_head":
                for i in range(len(_SSE_HEAD)):
                    if not await conn.gate() or not await conn.send(_SSE_HEAD[i : i + 1]):
                        return
                    await conn.sleep(_SLOW_HEAD_INTERVAL)
            elif not await conn.send(_SSE_HEAD):
                return
            if mode == "garbage":
                await self._garbage_body(conn, random.Random(seed))
            elif mode == "oversized":
                await self._oversized_body(conn)
            elif mode == "huge_event":
                await self._huge_event_body(conn)
            else:
                await self._event_body(conn, last)
        except OSError:
            conn.close_by_server()

    async def _event_body(self, conn: _Conn, last: int) -> None:
        assert conn.session is not None
        session = conn.session
        loop = asyncio.get_running_loop()
        n = last
        last_write = loop.time()
        last_event = -math.inf
        while await conn.gate():
            config = session.config
            now = loop.time()
            with self._lock:
                frame = session.scripted.popleft() if session.scripted else None
            if frame is not None:
                if conn.done:
                    with self._lock:
                        session.scripted.appendleft(frame)
                    return
                if not await conn.send(frame):
                    return
                last_write = now
                continue
            due = math.inf
            if config.total is None or n < config.total:
                # Due times follow from the current rate, so a rate change acts at once.
                due = last_event + 1 / config.rate if config.rate > 0 else now
                if now >= due:
                    n += 1
                    if not await self._emit(conn, n, config):
                        return
                    # Keep to the schedule (no drift), but restart it after a stall or a long
                    # block instead of bursting to catch up.
                    last_event = due if now - due < 1.0 else now
                    last_write = now
                    if config.rate <= 0 and n % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)
                    continue
            if config.heartbeat > 0:
                if now >= last_write + config.heartbeat:
                    if not await conn.send(_HEARTBEAT):
                        return
                    last_write = now
                    continue
                due = min(due, last_write + config.heartbeat)
            await conn.sleep(None if due == math.inf else due - now)

    async def _emit(self, conn: _Conn, n: int, config: _Config) -> bool:
        assert conn.session is not None and conn.transport is not None
        if conn.done:
            return False
        conn.transport.write(self._event(n, config.mode == "invalid_utf8"))
        with self._lock:
            conn.session.highest_emitted = max(conn.session.highest_emitted, n)
            if conn.record is not None:
                if conn.record.first is None:
                    conn.record.first = n
                conn.record.last = n
        return await conn.drain()

    async def _garbage_body(self, conn: _Conn, rng: random.Random) -> None:
        while await conn.gate():
            if not await conn.send(_garbage(rng, _GARBAGE_CHUNK)):
                return
            await conn.sleep(_GARBAGE_INTERVAL)

    async def _oversized_body(self, conn: _Conn) -> None:
        remaining = self.oversized_bytes
        chunk = b"x" * _WRITE_CHUNK
        if not await conn.send(b"data: "):
            return
        while remaining > 0 and await conn.gate():
            part = chunk[: min(remaining, _WRITE_CHUNK)]
            if not await conn.send(part):
                return
            remaining -= len(part)
            await asyncio.sleep(0)

    async def _huge_event_body(self, conn: _Conn) -> None:
        lines = _HUGE_EVENT_LINE * (_WRITE_CHUNK // len(_HUGE_EVENT_LINE))
        remaining = self.oversized_bytes
        while remaining > 0 and await conn.gate():
            if not await conn.send(lines):
                return
            remaining -= len(lines)
            await asyncio.sleep(0)
        await conn.send(b"\n")


def _redirect(location: str) -> bytes:
    return (
        f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")


def _last_id(value: str | None) -> int:
    try:
        return max(int(value or "0"), 0)
    except ValueError:
        return 0


def _check(config: _Config) -> _Config:
    if config.rate < 0 or config.heartbeat < 0:
        raise ValueError("rate and heartbeat must be >= 0")
    if config.total is not None and config.total < 0:
        raise ValueError("total must be >= 0 or None")
    status = config.mode.removeprefix("status:")
    if config.mode.startswith("redirect:"):
        if not config.location or any(ch in config.location for ch in "\r\n"):
            raise ValueError(f"bad redirect mode {config.mode!r}")
    elif config.mode.startswith("status:"):
        if not (status.isdigit() and 100 <= int(status) <= 599):
            raise ValueError(f"bad status mode {config.mode!r}")
    elif config.mode not in _MODES:
        raise ValueError(f"unknown mode {config.mode!r}")
    return config
