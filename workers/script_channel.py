"""The publisher's own connection to Redis: script runs written as RESP here and their replies
parsed by hiredis, below redis-py's pipeline.

At one event per second per session most publish rounds carry one or two calls, and a
redis-py pipeline costs more than the rest of such a round: the pipeline object, the retry
wrapper, a pool checkout and release, encoding each argument, a timeout scope per reply. On
one connection used for nothing else, a round is one ``write`` and its replies come back in
order to one future. The connection is made to where the worker's client would connect (its
address, or the primary the Sentinels name now, asked again on each connect), with its user,
password and database, and with the same connect timeout and TCP keepalive.

A round that meets a lost connection (or a primary demoted to a replica) is sent again on a
new connection, twice at most with a short backoff, as redis-py's retry does for a pipeline:
each script the publisher sends checks what it was sent against (the expected seq, the
lease), so a round applied once already is not applied twice.

A round whose replies do not all come within ``reply_timeout`` fails with
:class:`redis.exceptions.TimeoutError`, and the connection is dropped: a Redis that vanished
without closing it (a host gone, a partition) would otherwise hold the round, and every round
queued behind it, until TCP keepalive gave up hours later. One timer per connection checks the
oldest round waiting, not one per round.

Only for a single server or a Sentinel's primary over plain TCP: :meth:`ScriptChannel.of`
gives None for any other client (a cluster, TLS, a Unix socket, fakeredis), whose calls go
through :func:`listenerpool.scripts.call_many`'s pipelines as before.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as ReplyTimeout

# Sends of a round after its first, on a new connection each, and the waits before them:
# what the worker's redis-py client does for a pipeline (connections.async_redis).
RETRY_DELAYS = (0.05, 0.1)
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_REPLY_TIMEOUT = 10.0  # the default lease TTL: no round waits longer than a lease lives

# Error replies by their code, as redis-py raises them.
_ERRORS: dict[str, type[RedisError]] = {
    "NOSCRIPT": NoScriptError,
    "READONLY": ReadOnlyError,
    "WRONGPASS": AuthenticationError,
    "NOAUTH": AuthenticationError,
}


def reply_error(message: str) -> Exception:
    """The exception for an error reply, of the class redis-py gives it."""
    code = message.split(" ", 1)[0]
    if code == "LOADING":
        return BusyLoadingError(message)
    return _ERRORS.get(code, ResponseError)(message)


def no_reply_within(seconds: float) -> ReplyTimeout:
    """The error of a round whose replies did not all come within ``seconds``."""
    return ReplyTimeout(f"no reply from Redis within {seconds:g} s; connection dropped")


def pack(command: list[Any]) -> bytes:
    """One command as a RESP array of bulk strings (strings as UTF-8, numbers as decimals)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


@dataclass(slots=True)
class _Expected:
    count: int
    future: asyncio.Future[list[Any]]
    sent_at: float
    replies: list[Any] = field(default_factory=list)


class _Resp(asyncio.Protocol):
    """One connection: replies handed, in order, to the sends that await them, or a
    :class:`ReplyTimeout` to all of them once the oldest has waited ``reply_timeout``."""

    def __init__(self, reply_timeout: float) -> None:
        self._parser = hiredis.Reader(replyError=reply_error)
        self._expected: deque[_Expected] = deque()
        self._transport: asyncio.Transport | None = None
        self._reply_timeout = reply_timeout
        self._watch: asyncio.TimerHandle | None = None
        self.lost: RedisError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while True:
                reply = self._parser.gets()
                if reply is False:
                    return
                if not self._expected:
                    raise ConnectionError(f"Redis sent a reply nobody asked for: {reply!r}")
                expected = self._expected[0]
                expected.replies.append(reply)
                if len(expected.replies) == expected.count:
                    self._expected.popleft()
                    if not expected.future.done():
                        expected.future.set_result(expected.replies)
        except (hiredis.ProtocolError, ConnectionError) as exc:
            self.close(ConnectionError(f"unreadable reply from Redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def send(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Write ``payload`` (``count`` commands); a future of their ``count`` replies."""
        if self.lost is not None:
            raise self.lost
        assert self._transport is not None, "sending on a connection not made"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        now = loop.time()
        self._expected.append(_Expected(count, future, now))
        if self._watch is None:
            self._watch = loop.call_at(now + self._reply_timeout, self._check)
        self._transport.write(payload)
        return future

    def _check(self) -> None:
        """The watch timer: fail everything once the oldest round has waited too long, else
        look again when it will have."""
        self._watch = None
        if not self._expected:
            return
        due = self._expected[0].sent_at + self._reply_timeout
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self._watch = loop.call_at(due, self._check)
            return
        self.close(no_reply_within(self._reply_timeout))

    def close(self, why: RedisError) -> None:
        self._fail(why)
        if self._transport is not None:
            self._transport.abort()  # unread replies are worthless; nothing waits to flush

    def _fail(self, why: RedisError) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.lost is None:
            self.lost = why
        while self._expected:
            future = self._expected.popleft().future
            if not future.done():
                future.set_exception(why)


Address = Callable[[], Awaitable[tuple[str, int]]]


def _read_only(replies: list[Any]) -> ReadOnlyError | None:
    """The READONLY error among ``replies`` or the replies of their batched runs, if any. On
    a replica every write fails, so a round that met one wrote nothing."""
    for reply in replies:
        if isinstance(reply, ReadOnlyError):
            return reply
        if isinstance(reply, list):
            for inner in reply:
                if isinstance(inner, ReadOnlyError):
                    return inner
    return None


class ScriptChannel:
    """A connection of the caller's own that sends commands, as
    :data:`listenerpool.scripts.Send`: pass :meth:`send` as ``call_many``'s ``send``. One
    round at a time is meant (the publisher awaits each); a second is queued behind it."""

    def __init__(
        self,
        address: Address,
        *,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
    ) -> None:
        if reply_timeout <= 0:
            raise ValueError(f"reply_timeout must be positive, not {reply_timeout}")
        self._address = address
        self._username = username
        self._password = password
        self._db = db
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._retry_delays = retry_delays
        self._connection: _Resp | None = None
        self._connecting = asyncio.Lock()
        self._closed = False
        #: Connections made, for tests and the benches.
        self.connects = 0

    @classmethod
    def of(
        cls, client: Any, *, reply_timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> ScriptChannel | None:
        """A channel to the server ``client`` talks to, or None when ``client`` is not a
        redis-py asyncio client of a single server or a Sentinel's primary over plain TCP."""
        if type(client) is not aioredis.Redis:
            return None
        pool = client.connection_pool
        settings = pool.connection_kwargs
        address: Address
        if isinstance(pool, SentinelConnectionPool):
            if pool.connection_class is not SentinelManagedConnection or not pool.is_master:
                return None
            address = pool.get_master_address
        elif pool.connection_class is aioredis.Connection:
            host, port = settings.get("host", "localhost"), int(settings.get("port", 6379))

            async def address() -> tuple[str, int]:
                return host, port

        else:
            return None
        if settings.get("credential_provider") is not None:
            return None
        return cls(
            address,
            username=settings.get("username"),
            password=settings.get("password"),
            db=int(settings.get("db") or 0),
            connect_timeout=settings.get("socket_connect_timeout") or DEFAULT_CONNECT_TIMEOUT,
            reply_timeout=reply_timeout,
        )

    async def send(self, commands: list[list[Any]]) -> list[Any]:
        """Send ``commands`` in one write; their replies in order (an error reply as its
        exception). Raises :class:`redis.exceptions.ConnectionError` (or ``TimeoutError`` on
        connecting) when the last attempt failed, and :class:`redis.exceptions.TimeoutError`,
        at once, when the replies did not come within the reply timeout: the round may have
        been applied, and the scripts' own checks make a caller's next round safe."""
        payload = b"".join(pack(command) for command in commands)
        for delay in (*self._retry_delays, None):
            try:
                connection = await self._connected()
                replies = await connection.send(payload, len(commands))
                demoted = _read_only(replies)
                if demoted is None:
                    return replies
                # The server it was sent to is a replica now (a failover): none of it ran.
                why = ConnectionError(f"Redis is a read-only replica now: {demoted}")
                connection.close(why)
                raise why
            except (ConnectionError, TimeoutError, OSError):
                if delay is None or self._closed:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        """Close the connection; sends under way fail, later ones raise."""
        self._closed = True
        if self._connection is not None:
            self._connection.close(ConnectionError("the script channel was closed"))

    async def _connected(self) -> _Resp:
        if self._closed:
            raise ConnectionError("the script channel was closed")
        connection = self._connection
        if connection is not None and connection.lost is None:
            return connection
        async with self._connecting:
            if self._connection is not None and self._connection.lost is None:
                return self._connection
            try:
                async with asyncio.timeout(self._connect_timeout):
                    self._connection = await self._connect()
            except TimeoutError:
                raise TimeoutError(
                    f"connecting to Redis took longer than {self._connect_timeout} s"
                ) from None
            return self._connection

    async def _connect(self) -> _Resp:
        host, port = await self._address()
        loop = asyncio.get_running_loop()
        try:
            transport, connection = await loop.create_connection(
                lambda: _Resp(self._reply_timeout), host, port
            )
        except OSError as exc:
            raise ConnectionError(f"cannot connect to Redis at {host}:{port}: {exc}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.connects += 1
        handshake: list[list[Any]] = []
        if self._password is not None:
            credentials = [self._username, self._password] if self._username else [self._password]
            handshake.append(["AUTH", *credentials])
        if self._db:
            handshake.append(["SELECT", self._db])
        if handshake:
            replies = await connection.send(b"".join(map(pack, handshake)), len(handshake))
            failed = next((r for r in replies if isinstance(r, Exception)), None)
            if failed is not None:
                connection.close(ConnectionError("handshake refused"))
                raise failed
        return connection
