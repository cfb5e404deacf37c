"""The fan-out hub: one sharded pub/sub connection per Redis node per gateway process (one in
all on a single server, one per primary on a cluster), shared by every client.

A session's live channel is subscribed (SSUBSCRIBE) while at least one local client follows it
and unsubscribed when the last one leaves. Messages are parsed once (for their seq) and the same
preserialised envelope is queued to every client. A client's queue is bounded by count and
bytes; a client that falls behind is marked overflowed, never silently skipped.

After a channel's subscription is lost and restored (connection loss, failover, the channel's
slot migrated to another node; see :mod:`listenerpool.shardsub`), and periodically, its clients
are told to catch up from the history stream, since messages published meanwhile never arrive
live.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.wsprotocol import text_frame
from listenerpool import keys
from listenerpool.envelope import seq_of
from listenerpool.metrics import GatewayMetrics, Transport
from listenerpool.replies import reply_text
from listenerpool.shardsub import REDIS_ERRORS, ShardedSubscriber
from listenerpool.tasks import cancel_until_done

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Live:
    """A live envelope as published: its seq, its JSON text, that text in UTF-8 (as it came
    from Redis) and framed for WebSocket: made once, whatever the number of clients."""

    seq: int
    raw: str
    utf8: bytes
    frame: bytes  # as a WebSocket text frame (see gateway.wsprotocol.text_frame)


class _CatchUp:
    """Queued to a client when messages may have been missed: read the stream past your seq."""


CATCH_UP: Final = _CatchUp()


class Overflowed(Exception):
    """The subscriber's queue overflowed; what it held was dropped with it."""


class HubUnavailable(Exception):
    """The hub could not subscribe in time (Redis unreachable)."""


class QueueBudget:
    """The bound on what subscribers hold together, by count and bytes: each client's own, or
    one for all the sessions of a multiplexed connection. Past it, :attr:`overflowed` is set."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.items = 0
        self.bytes = 0
        self.overflowed = asyncio.Event()

    def fits(self, size: int) -> bool:
        return self.items < self.max_items and self.bytes + size <= self.max_bytes


class Subscriber:
    """One client following one session: a queue of :class:`Live` envelopes, bounded by its
    :class:`QueueBudget`."""

    def __init__(
        self, sid: str, *, max_items: int, max_bytes: int, budget: QueueBudget | None = None
    ) -> None:
        self.sid = sid
        self._budget = budget if budget is not None else QueueBudget(max_items, max_bytes)
        self._items: deque[Live | _CatchUp] = deque()
        self._ready = asyncio.Event()
        self._waiting = False  # its reader is parked in get() with nothing queued
        self.overflowed = self._budget.overflowed
        #: Set by a WebSocket client's reader: writes a live item straight to the client while
        #: the reader waits (True when it did), so the common case skips the queue and the task
        #: switch. The hub counts those deliveries (the reader never sees them).
        self.direct: Callable[[Live], bool] | None = None

    def push(self, item: Live | _CatchUp) -> bool:
        """Queue ``item``, or write it to the client at once (True)."""
        # A waiting reader has nothing queued and has not overflowed (its overflow wakes it).
        if self._waiting and self.direct is not None and isinstance(item, Live):
            try:
                if self.direct(item):
                    return True
            except Exception:  # one client's failure must not stop the fan-out to the others
                log.exception("direct write to a client of %s failed; queueing", self.sid)
                self.direct = None
        if self.overflowed.is_set():
            return False
        budget = self._budget
        if isinstance(item, Live):
            if not budget.fits(len(item.raw)):
                self.overflowed.set()
                self.drop()
                self._ready.set()
                return False
            budget.items += 1
            budget.bytes += len(item.raw)
        elif self._items and self._items[-1] is CATCH_UP:
            return False
        self._items.append(item)
        self._ready.set()
        return False

    async def get(self) -> Live | _CatchUp:
        """The next item; raises :class:`Overflowed` once the queue has overflowed."""
        while not self._items:
            if self.overflowed.is_set():
                raise Overflowed
            self._ready.clear()
            self._waiting = True
            try:
                await self._ready.wait()
            finally:
                self._waiting = False
        if self.overflowed.is_set():
            self.drop()
            raise Overflowed
        item = self._items.popleft()
        if isinstance(item, Live):
            self._budget.items -= 1
            self._budget.bytes -= len(item.raw)
        return item

    def drop(self) -> None:
        """Give back what the queue holds (it overflowed, or its client left)."""
        for item in self._items:
            if isinstance(item, Live):
                self._budget.items -= 1
                self._budget.bytes -= len(item.raw)
        self._items.clear()


@dataclass(slots=True)
class _Channel:
    sid: str
    name: str
    subscribers: set[Subscriber] = field(default_factory=set)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    max_seq: int = 0


class FanoutHub:
    """Owns the subscription connections and the periodic stream check; :meth:`aclose` stops
    both."""

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
        self._lock = asyncio.Lock()  # orders joins and leaves of one channel
        self._shards = ShardedSubscriber(
            redis,
            on_message=self._on_message,
            on_active=self._on_active,
            on_interrupted=self._on_interrupted,
            on_error=self._on_error,
        )
        self._task: asyncio.Task[None] | None = None
        self.resubscribes = 0
        self._metrics = metrics if metrics is not None else GatewayMetrics()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self._shards.start()
        self._task = asyncio.create_task(self._run(), name="fanout-hub")

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_until_done(self._task)
            self._task = None
        await self._shards.aclose()

    # -- clients -----------------------------------------------------------------------------
    def channels(self) -> int:
        return len(self._channels)

    def nodes(self) -> dict[str, int]:
        """Followed channels per Redis node (one subscription connection each)."""
        return self._shards.nodes()

    def budget(self) -> QueueBudget:
        """A budget of one client's size, to share among the sessions of one connection."""
        return QueueBudget(self._max_items, self._max_bytes)

    async def join(self, sid: str, budget: QueueBudget | None = None) -> Subscriber:
        """Follow ``sid``. Returns once the subscription is confirmed by Redis, so anything
        published after this returns reaches the subscriber. Raises :class:`HubUnavailable`.
        ``budget`` bounds its queue together with others' (by default, its own)."""
        sub = self.subscriber(sid, budget)
        await self.attach(sub)
        return sub

    def subscriber(self, sid: str, budget: QueueBudget | None = None) -> Subscriber:
        """A subscriber not yet following ``sid``: :meth:`attach` it, and :meth:`leave` it
        however the attach ended (even cancelled half-way)."""
        return Subscriber(sid, max_items=self._max_items, max_bytes=self._max_bytes, budget=budget)

    async def attach(self, sub: Subscriber) -> None:
        """:meth:`join` for a subscriber made by :meth:`subscriber`."""
        name = keys.SessionKeys(sub.sid).live
        async with self._lock:
            channel = self._channels.get(name)
            if channel is None:
                channel = _Channel(sub.sid, name)
                self._channels[name] = channel
                channel.subscribers.add(sub)  # before the await: a leave then finds it
                await self._shards.subscribe(name)
            channel.subscribers.add(sub)
        try:
            async with asyncio.timeout(self._subscribe_timeout):
                await channel.confirmed.wait()
        except TimeoutError:
            await self.leave(sub)
            raise HubUnavailable("could not subscribe to the session's live channel") from None

    async def leave(self, sub: Subscriber) -> None:
        name = keys.SessionKeys(sub.sid).live
        async with self._lock:
            channel = self._channels.get(name)
            if channel is None:
                sub.drop()
                return
            channel.subscribers.discard(sub)
            sub.drop()  # what it held no longer counts against a shared budget
            if channel.subscribers:
                return
            del self._channels[name]
            await self._shards.unsubscribe(name)

    # -- subscription events -----------------------------------------------------------------
    def _on_message(self, name: str, data: Any) -> None:
        channel = self._channels.get(name)
        if channel is None:
            return
        utf8 = data if isinstance(data, bytes) else str(data).encode()
        raw = utf8.decode()
        try:
            seq = seq_of(raw)
        except ValueError:
            log.warning("ignoring a malformed envelope on %s", name)
            return
        channel.max_seq = max(channel.max_seq, seq)
        item = Live(seq, raw, utf8, text_frame(utf8))
        written = 0
        for sub in channel.subscribers:
            written += sub.push(item)
        if written:
            self._metrics.delivered[Transport.WS].inc(written)  # once per event, not per client

    def _on_active(self, name: str, resumed: bool) -> None:
        channel = self._channels.get(name)
        if channel is None:
            return
        if resumed:
            # Subscribed again: what was published while it was not is only in the history.
            self.resubscribes += 1
            self._metrics.pubsub_resubscribes.inc()
            for sub in channel.subscribers:
                sub.push(CATCH_UP)
        channel.confirmed.set()

    def _on_interrupted(self, name: str) -> None:
        channel = self._channels.get(name)
        if channel is not None:
            # Joins wait until it is subscribed again (the join is subscribe-then-read).
            channel.confirmed.clear()

    def _on_error(self, exc: BaseException) -> None:
        self._metrics.redis_error["pubsub"].inc()

    # -- periodic check ----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            try:
                await self._check_streams()
            except REDIS_ERRORS as exc:
                log.info("stream check skipped: %s", exc)

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
            if head and int(reply_text(head[0][0]).split("-", 1)[0]) > ch.max_seq:
                for sub in ch.subscribers:
                    sub.push(CATCH_UP)
