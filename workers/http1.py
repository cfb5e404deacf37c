"""One upstream HTTP/1.1 exchange as an :class:`asyncio.Protocol` around an h11 connection.

A worker holds thousands of idle streams, so one costs a transport, this protocol, its h11
state and one loop timer, and nothing while no byte arrives: no read task, no coroutine and no
timeout object per read. The reader sends one GET, waits for the head (bounded by the head deadline,
so a server dribbling its head byte by byte cannot hold it), then takes body bytes as they come
(bounded by the idle timeout). Framing (chunked, Content-Length, until close) is h11's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import h11

from listenerpool.errors import UpstreamError
from listenerpool.metrics import ReconnectReason

# h11's default limit on a response head is 16 KiB; httpcore's, which upstreams met before, is
# 100 KiB.
MAX_HEAD_BYTES = 100 * 1024
# Body bytes buffered for a reader busy publishing before the socket stops being read.
HIGH_WATER = 256 * 1024


class UpstreamBroken(Exception):
    """The connection failed below the SSE layer; the message is the session's ``last_error``
    and ``reason`` the reconnect's."""

    def __init__(self, message: str, reason: ReconnectReason) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A response's status and headers (lower-case names; repeated ones joined by ", ")."""

    status_code: int
    headers: dict[str, str]


class Http1Protocol(asyncio.Protocol):
    """Sends ``request`` (a GET, no body) when told to (:meth:`send_request`), once connected,
    then hands the head and body over.

    ``head_deadline`` (a loop time, None: none) ends the exchange with
    :class:`~listenerpool.errors.UpstreamError` unless the head is complete by then;
    ``idle_timeout`` (s) ends it with :class:`UpstreamBroken` after that long without a byte
    while the reader waits for one. The timer runs in ``timer_context`` (None: a copy of the
    context at each scheduling, asyncio's default; a copy per timer is memory an idle stream
    need not keep).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_decode",
        "_done",
        "_eof",
        "_error",
        "_h11",
        "_head",
        "_head_deadline",
        "_head_done",
        "_head_timeout",
        "_idle_timeout",
        "_last_data",
        "_loop",
        "_notify",
        "_paused",
        "_request",
        "_timer",
        "_timer_context",
        "_waiter",
        "transport",
    )

    def __init__(
        self,
        request: h11.Request,
        *,
        head_deadline: float | None,
        head_timeout: float | None,
        idle_timeout: float,
        timer_context: contextvars.Context | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._request: h11.Request | None = request
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.transport: asyncio.Transport | None = None
        self._head: ResponseHead | None = None  # let go once the body is read
        self._head_done = False
        self._decode: Callable[[bytes], bytes] | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._done = False  # the body is complete (or the connection ended cleanly)
        self._eof = False  # h11 was told the connection ended
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._notify: Callable[[], None] | None = None
        self._idle_timeout = idle_timeout
        self._timer_context = timer_context
        self._last_data = self._loop.time()
        self._head_timeout = head_timeout
        self._head_deadline = head_deadline
        # The one timer (head deadline, then idle timeout) starts with the connection: a
        # protocol whose connect failed leaves none behind.
        self._timer: asyncio.TimerHandle | None = None

    # -- the reader's side -------------------------------------------------------------------
    async def head(self) -> ResponseHead:
        """The response head, once complete; raises what ended the exchange before it."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self.readable()
        assert self._head is not None, "the head is let go once the body is read"
        return self._head

    async def read(self) -> bytes:
        """The body bytes received since the last call (waiting for some), or ``b""`` once
        the body is complete; raises what ended the exchange (after the bytes before it)."""
        while (data := self.take()) is None:
            await self.readable()
        return data

    def readable(self) -> asyncio.Future[None]:
        """Done when there is news for :meth:`take` (or :meth:`head`). A plain future, so an
        idle reader awaiting it keeps no coroutine of this class alive."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = self._loop.create_future()
        return waiter

    def notify(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when there is news for :meth:`take`: bytes, the body's end,
        or what ended the exchange (the idle timeout too). The reader's way to wait with no
        task; ask only after :meth:`take` returned None."""
        self._notify = callback

    def take(self) -> bytes | None:
        """What :meth:`read` returns, without waiting: None when nothing came yet."""
        self._head = None  # read by now; an idle stream should not keep its headers
        if not self._chunks:
            if self._error is not None:
                raise self._error
            return b"" if self._done else None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = False
            self._last_data = self._loop.time()  # silence while paused was ours, not theirs
            self.transport.resume_reading()
        return data

    def abort(self) -> None:
        """Close the connection now (no TLS close_notify, no waiting for buffered writes) and
        stop the timer; what the reader awaits ends as closed."""
        self._stop_timer()
        transport = self.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # The transport closes its socket on the next loop iteration; a FIN now tells
                # the upstream at once even if this loop is slow to get there.
                with contextlib.suppress(OSError):  # already closed or reset
                    sock.shutdown(socket.SHUT_RDWR)
            transport.abort()
        self._fail(_closed())

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        notify = self._notify
        if notify is not None and (self._chunks or self._done or self._error is not None):
            self._notify = None
            notify()

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(self._next_due(), self._tick, context=self._timer_context)

    def send_request(self) -> None:
        """Write the request, once the connection is made and its opener still wants it. Not
        in :meth:`connection_made`: that runs even when the connect that made it was cancelled
        (a timeout, a reader stopped) in the same loop pass, and closing the transport then
        would still flush the request to the upstream."""
        request, self._request = self._request, None
        assert request is not None and self.transport is not None, "one request, once connected"
        try:
            data = b"".join(self._h11.send(event) or b"" for event in (request, h11.EndOfMessage()))
        except h11.LocalProtocolError as exc:
            self.transport.abort()
            self._fail(_malformed("LocalProtocolError", exc))
            return
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        self._receive(data)

    def eof_received(self) -> bool | None:
        self._receive(b"")
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._error is None and not self._done:
            self._fail(_broken(exc))
        else:
            self._receive(b"")  # h11 decides: a body read until close ends, any other is cut
        self._stop_timer()
        self._fail(_closed())

    # -- h11 ---------------------------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        if self._error is not None or self._done or self._eof:
            return
        if not data:
            self._eof = True
        self._h11.receive_data(data)
        try:
            self._pump()
        except h11.RemoteProtocolError as exc:
            self._fail(_malformed("RemoteProtocolError", exc))
        except zlib.error as exc:
            self._fail(_malformed("DecodingError", exc))
        self._wake()
        if self._error is not None or self._done:
            self._close()

    def _pump(self) -> None:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Response):
                self._on_head(event)
            elif isinstance(event, h11.Data):
                data = bytes(event.data)
                if self._decode is not None:
                    data = self._decode(data)
                if data:
                    self._chunks.append(data)
                    self._buffered += len(data)
                    if self._buffered > HIGH_WATER and not self._paused:
                        self._paused = True
                        assert self.transport is not None
                        self.transport.pause_reading()
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                if not self._head_done:
                    raise h11.RemoteProtocolError("Server disconnected without sending a response.")
                self._done = True
                return
            # an InformationalResponse (1xx) precedes the real head: nothing to do

    def _on_head(self, event: h11.Response) -> None:
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self._head = ResponseHead(event.status_code, headers)
        self._head_done = True
        self._decode = content_decoder(headers.get("content-encoding", ""))

    # -- endings -----------------------------------------------------------------------------
    def _fail(self, error: BaseException) -> None:
        """Record what ended the exchange, unless it ended already (a complete body too)."""
        if self._error is None and not self._done:
            self._error = error
        self._wake()

    def _close(self) -> None:
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _next_due(self) -> float:
        due = self._last_data + self._idle_timeout
        if not self._head_done and self._head_deadline is not None:
            due = min(due, self._head_deadline)
        return due

    def _tick(self) -> None:
        # Moved on only when it fires, so a byte received costs no timer. A complete head ends
        # the head deadline; the idle timeout counts while the reader waits for bytes.
        self._timer = None
        now = self._loop.time()
        if not self._head_done and self._head_deadline is not None and now >= self._head_deadline:
            self._fail(
                UpstreamError(
                    f"upstream sent no complete response head within "
                    f"{self._head_timeout or 0:.3g}s",
                    permanent=False,
                )
            )
            self._close()
            return
        if self._chunks or self._paused:
            self._last_data = now  # the reader has bytes to take: not idle
        due = self._next_due()
        if due > now:
            self._timer = self._loop.call_at(due, self._tick, context=self._timer_context)
            return
        self._fail(
            UpstreamBroken(
                f"no bytes from upstream for {self._idle_timeout:g}s (idle timeout)",
                ReconnectReason.IDLE_TIMEOUT,
            )
        )
        self._close()


def _malformed(kind: str, exc: Exception) -> UpstreamBroken:
    return UpstreamBroken(
        f"upstream connection failed: {kind}: {exc}", ReconnectReason.PROTOCOL_ERROR
    )


def _closed() -> UpstreamBroken:
    return UpstreamBroken("upstream connection closed", ReconnectReason.EOF)


def _broken(exc: Exception) -> UpstreamBroken:
    return UpstreamBroken(
        f"upstream connection failed: {type(exc).__name__}: {exc}", ReconnectReason.CONNECT_ERROR
    )


def content_decoder(content_encoding: str) -> Callable[[bytes], bytes] | None:
    """A function undoing the gzip and deflate codings the header names, in order (other
    codings are passed through as they are); None when there is nothing to undo."""
    steps: list[Callable[[bytes], bytes]] = []
    for coding in reversed([c.strip().lower() for c in content_encoding.split(",")]):
        if coding in ("gzip", "x-gzip"):
            steps.append(zlib.decompressobj(zlib.MAX_WBITS | 16).decompress)
        elif coding == "deflate":
            steps.append(_Deflate().decode)
    if not steps:
        return None

    def decode(data: bytes) -> bytes:
        for step in steps:
            data = step(data)
        return data

    return decode


class _Deflate:
    """ "deflate" is meant to be zlib-wrapped, but servers also send it raw."""

    __slots__ = ("_first", "_inner")

    def __init__(self) -> None:
        self._inner = zlib.decompressobj()
        self._first = True

    def decode(self, data: bytes) -> bytes:
        first, self._first = self._first, False
        try:
            return self._inner.decompress(data)
        except zlib.error:
            if not first:
                raise
            self._inner = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._inner.decompress(data)
