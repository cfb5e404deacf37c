"""The fan-out hub: one Redis pub/sub connection per gateway process, shared by every client.

A session's live channel is subscribed while at least one local client follows it and
unsubscribed when the last one leaves. Messages are parsed once (for their seq) and the same
preserialised envelope is queued to every client. A client's queue is bounded by count and
bytes; a client that falls behind is marked overflowed, never silently skipped.

After the pub/sub connection is lost and restored, and periodically, every client is told to
catch up from the history stream, since messages published meanwhile never arrive live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import redis.exceptions

from listenerpool import keys
from listenerpool.envelope import seq_of
from listenerpool.metrics import GatewayMetrics
from listenerpool.tasks import cancel_until_done

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Live:
    """A live envelope as published: its seq and its JSON text."""

    seq: int
    raw: str


class _CatchUp:
    """Queued to a client when messages may have been missed: read the stream past your seq."""


CATCH_UP: Final = _CatchUp()


class Overflowed(Exception):
    """The subscriber's queue overflowed; what it held was dropped with it."""


class HubUnavailable(Exception):
    """The hub could not subscribe in time (Redis unreachable)."""


class Subscriber:
    """One client following one session: a bounded queue of :class:`Live` envelopes."""

    def __init__(self, sid: str, *, max_items: int, max_bytes: int) -> None:
        self.sid = sid
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._items: deque[Live | _CatchUp] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self.overflowed = asyncio.Event()

    def push(self, item: Live | _CatchUp) -> None:
        if self.overflowed.is_set():
            return
        if isinstance(item, Live):
            if len(self._items) >= self._max_items or self._bytes + len(item.raw) > self._max_bytes:
                self.overflowed.set()
                self._items.clear()
                self._bytes = 0
                self._ready.set()
                return
            self._bytes += len(item.raw)
        elif self._items and self._items[-1] is CATCH_UP:
            return
        self._items.append(item)
        self._ready.set()

    async def get(self) -> Live | _CatchUp:
        """The next item; raises :class:`Overflowed` once the queue has overflowed."""
        while not self._items:
            if self.overflowed.is_set():
                raise Overflowed
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, Live):
            self._bytes -= len(item.raw)
        return item


@dataclass(slots=True)
class _Channel:
    sid: str
    name: str
    subscribers: set[Subscriber] = field(default_factory=set)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    max_seq: int = 0


class FanoutHub:
    """Owns the pub/sub connection and its reader task; :meth:`aclose` stops both."""

    def __init__(
        self,
        redis: Any,
        *,
        max_items: int = 1024,
        max_bytes: int = 1 << 20,
        check_interval: float = 20.0,
        subscribe_timeout: float = 5.0,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._redis = redis
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._check_interval = check_interval
        self._subscribe_timeout = subscribe_timeout
        self._channels: dict[str, _Channel] = {}  # by channel name
        self._pending: dict[str, int] = {}  # SUBSCRIBE commands sent, not yet confirmed
        self._lock = asyncio.Lock()  # orders SUBSCRIBE/UNSUBSCRIBE on the one connection
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self.resubscribes = 0
        self._metrics = metrics if metrics is not None else GatewayMetrics()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fanout-hub")

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_until_done(self._task)
            self._task = None
        await self._close_pubsub()

    # -- clients -----------------------------------------------------------------------------
    def channels(self) -> int:
        return len(self._channels)

    async def join(self, sid: str) -> Subscriber:
        """Follow ``sid``. Returns once the subscription is confirmed by Redis, so anything
        published after this returns reaches the subscriber. Raises :class:`HubUnavailable`."""
        name = keys.SessionKeys(sid).live
        sub = Subscriber(sid, max_items=self._max_items, max_bytes=self._max_bytes)
        async with self._lock:
            channel = self._channels.get(name)
            if channel is None:
                channel = _Channel(sid, name)
                self._channels[name] = channel
                await self._subscribe([channel])
            channel.subscribers.add(sub)
        try:
            async with asyncio.timeout(self._subscribe_timeout):
                await channel.confirmed.wait()
        except TimeoutError:
            await self.leave(sub)
            raise HubUnavailable("could not subscribe to the session's live channel") from None
        return sub

    async def leave(self, sub: Subscriber) -> None:
        name = keys.SessionKeys(sub.sid).live
        async with self._lock:
            channel = self._channels.get(name)
            if channel is None:
                return
            channel.subscribers.discard(sub)
            if channel.subscribers:
                return
            del self._channels[name]
            if self._pubsub is not None:
                try:
                    await self._pubsub.unsubscribe(name)
                except REDIS_ERRORS as exc:
                    log.debug(
                        "unsubscribe %s failed (the connection will be replaced): %s", name, exc
                    )

    # -- the reader --------------------------------------------------------------------------
    async def _subscribe(self, channels: list[_Channel]) -> None:
        """Send SUBSCRIBE (caller holds the lock). Without a connection this is left to the
        reader, which subscribes every channel when it connects."""
        if self._pubsub is None or not channels:
            return
        for ch in channels:
            self._pending[ch.name] = self._pending.get(ch.name, 0) + 1
        try:
            await self._pubsub.subscribe(*(ch.name for ch in channels))
        except REDIS_ERRORS as exc:
            log.warning("subscribe failed: %s", exc)

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                await self._connect()
                delay = 0.2
                await self._read()
            except REDIS_ERRORS as exc:
                self._metrics.redis_error["pubsub"].inc()
                log.warning("pub/sub connection lost (%s); reconnecting in %.1fs", exc, delay)
            await self._close_pubsub()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        pubsub = self._redis.pubsub()
        await pubsub.connect()
        async with self._lock:
            self._pubsub = pubsub
            self._pending.clear()
            channels = list(self._channels.values())
            for ch in channels:
                # Confirmed before: it may have missed messages while we were away.
                if ch.confirmed.is_set():
                    ch.confirmed.clear()
                    for sub in ch.subscribers:
                        sub.push(CATCH_UP)
            await self._subscribe(channels)
        if channels:
            self._resubscribed()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self._check_interval
        while True:
            message = await self._pubsub.get_message(timeout=1.0)
            if message is not None:
                self._on_message(message)
                # Buffered messages are returned without awaiting the socket: yield so the
                # clients' senders drain their queues between messages, not after a burst.
                await asyncio.sleep(0)
            if loop.time() >= next_check:
                next_check = loop.time() + self._check_interval
                await self._check_streams()

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        name = _text(message.get("channel"))
        channel = self._channels.get(name)
        if kind == "message":
            if channel is None:
                return
            raw = _text(message["data"])
            try:
                seq = seq_of(raw)
            except ValueError:
                log.warning("ignoring a malformed envelope on %s", name)
                return
            channel.max_seq = max(channel.max_seq, seq)
            item = Live(seq, raw)
            for sub in channel.subscribers:
                sub.push(item)
        elif kind == "subscribe":
            pending = self._pending.get(name, 0)
            if pending > 0:
                self._pending[name] = pending - 1
            elif channel is not None:
                # Re-subscribed by the client library after a reconnect of its own.
                self._resubscribed()
                for sub in channel.subscribers:
                    sub.push(CATCH_UP)
            if channel is not None and self._pending.get(name, 0) == 0:
                channel.confirmed.set()

    def _resubscribed(self) -> None:
        self.resubscribes += 1
        self._metrics.pubsub_resubscribes.inc()

    async def _check_streams(self) -> None:
        """A lost message followed by silence shows no seq gap: compare each followed session's
        history head with the last seq seen live, and send its clients to catch up if behind."""
        channels = [ch for ch in self._channels.values() if ch.confirmed.is_set()]
        if not channels:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for ch in channels:
                pipe.xrevrange(keys.SessionKeys(ch.sid).events, count=1)
            heads = await pipe.execute()
        for ch, head in zip(channels, heads, strict=True):
            if head and int(_text(head[0][0]).split("-", 1)[0]) > ch.max_seq:
                for sub in ch.subscribers:
                    sub.push(CATCH_UP)

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
