"""Sharded pub/sub (``SSUBSCRIBE``) with one connection per Redis node, whatever the channels.

A process follows many channels (a gateway: one per session with local clients) over one
subscription connection per node that owns at least one of them: one in all on a single
server or a Sentinel primary, one per primary on a cluster, never one per channel.

The subscriber keeps each channel on the node that serves its hash slot. When that changes --
the node's connection is lost (a crash, a failover), the node tells us it gave the slot away
(an unsolicited ``sunsubscribe`` after a slot migration or a demotion), or a node answers
``MOVED`` -- it re-reads the slot map and subscribes the channel again where it now lives.
Messages published in between are not delivered: the owner is told when a channel's
subscription is interrupted and when it is active again (``resumed``), and catches up from
the history itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions
from redis.crc import key_slot

from listenerpool.replies import reply_text
from listenerpool.tasks import cancel_until_done
from listenerpool.topology import Topology

log = logging.getLogger(__name__)

# RedisClusterException (e.g. SlotNotCoveredError while a slot has no owner) is no RedisError.
REDIS_ERRORS = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
    TimeoutError,
)
IDLE_PING = 15.0  # s of silence after which a subscription connection is checked
PING_TIMEOUT = 5.0
PLACE_RETRY = 0.5  # s between attempts to place channels whose node is unknown
MAX_RECONNECT_DELAY = 2.0


@dataclass(slots=True)
class _Channel:
    node: str | None = None  # the node whose link holds it; None: not placed yet
    active: bool = False  # confirmed by the server and not lost since
    ever: bool = False  # was active once: a later activation may have missed messages


@dataclass(eq=False, slots=True)
class _Link:
    """The subscription connection to one node and the channels it carries."""

    node: str
    channels: set[str] = field(default_factory=set)
    pubsub: Any = None  # None while (re)connecting
    pending: Counter[str] = field(default_factory=Counter)  # SSUBSCRIBE sent, not confirmed
    leaving: Counter[str] = field(default_factory=Counter)  # SUNSUBSCRIBE sent by us
    task: asyncio.Task[None] | None = None


class ShardedSubscriber:
    """Follow sharded channels of the pool's client ``redis``. Use as an async context manager
    (or :meth:`start` / :meth:`aclose`); it owns its connections and tasks.

    Callbacks run on the event loop and must not block:

    - ``on_message(channel, data)`` for every message;
    - ``on_active(channel, resumed)`` when a subscription is confirmed; ``resumed`` is True
      when the channel was active before and was interrupted since (messages may be missing);
    - ``on_interrupted(channel)`` when an active subscription is lost;
    - ``on_error(exc)`` when a node's connection fails.
    """

    def __init__(
        self,
        redis: Any,
        *,
        on_message: Callable[[str, Any], None],
        on_active: Callable[[str, bool], None] = lambda channel, resumed: None,
        on_interrupted: Callable[[str], None] = lambda channel: None,
        on_error: Callable[[BaseException], None] = lambda exc: None,
    ) -> None:
        self._topology = Topology(redis)
        self._on_message = on_message
        self._on_active = on_active
        self._on_interrupted = on_interrupted
        self._on_error = on_error
        self._channels: dict[str, _Channel] = {}
        self._links: dict[str, _Link] = {}
        self._homeless: set[str] = set()
        self._lock = asyncio.Lock()  # orders bookkeeping and the commands sent on each link
        self._tg: asyncio.TaskGroup | None = None
        self._main: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._main = asyncio.create_task(self._supervise(), name="sharded-subscriber")
        await self._started.wait()

    async def aclose(self) -> None:
        if self._main is not None:
            await cancel_until_done(self._main)
            self._main = None
        for link in self._links.values():
            await _close(link.pubsub)
            link.pubsub = None
        self._links.clear()
        await self._topology.aclose()

    async def __aenter__(self) -> ShardedSubscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- channels ----------------------------------------------------------------------------
    def is_active(self, channel: str) -> bool:
        found = self._channels.get(channel)
        return found is not None and found.active

    def nodes(self) -> dict[str, int]:
        """Channels followed per node (for tests and metrics)."""
        return {node: len(link.channels) for node, link in self._links.items()}

    async def subscribe(self, channel: str) -> None:
        """Follow ``channel`` (idempotent). Returns once SSUBSCRIBE is sent or, without a
        connection, left for the link to send; :meth:`is_active` / ``on_active`` tell when the
        server confirmed it."""
        async with self._lock:
            if channel in self._channels:
                return
            self._channels[channel] = _Channel()
            await self._place([channel])

    async def unsubscribe(self, channel: str) -> None:
        """Stop following ``channel`` (idempotent)."""
        async with self._lock:
            found = self._channels.pop(channel, None)
            self._homeless.discard(channel)
            if found is None or found.node is None:
                return
            link = self._links.get(found.node)
            if link is None:
                return
            link.channels.discard(channel)
            link.pending.pop(channel, None)
            if link.pubsub is not None:
                link.leaving[channel] += 1
                try:
                    await link.pubsub.sunsubscribe(channel)
                except REDIS_ERRORS as exc:
                    log.debug("sunsubscribe %s failed (the link reconnects): %s", channel, exc)

    # -- placement (caller holds the lock) ---------------------------------------------------
    async def _place(self, channels: Iterable[str]) -> None:
        """Put each channel on the link of the node serving its slot now and subscribe it
        there. Channels whose node cannot be told now are retried shortly."""
        by_link: dict[_Link, list[str]] = defaultdict(list)
        for channel in channels:
            state = self._channels.get(channel)
            if state is None:
                continue
            try:
                node = await self._topology.node_of(channel)
            except REDIS_ERRORS as exc:
                log.info("no node for %s yet (%s); retrying", channel, exc)
                self._homeless.add(channel)
                continue
            self._homeless.discard(channel)
            if state.node is not None and state.node != node:
                old = self._links.get(state.node)
                if old is not None:
                    old.channels.discard(channel)
                    old.pending.pop(channel, None)
            state.node = node
            link = self._link(node)
            link.channels.add(channel)
            by_link[link].append(channel)
        for link, placed in by_link.items():
            await self._send_subscribe(link, placed)

    async def _send_subscribe(self, link: _Link, channels: list[str]) -> None:
        if link.pubsub is None or not channels:
            return  # the link subscribes all its channels when it connects
        # On a cluster one SSUBSCRIBE may name channels of one slot only.
        by_slot: dict[int, list[str]] = defaultdict(list)
        for channel in channels:
            by_slot[key_slot(channel.encode())].append(channel)
        try:
            for group in by_slot.values():
                for channel in group:
                    link.pending[channel] += 1
                await link.pubsub.ssubscribe(*group)
        except REDIS_ERRORS as exc:
            log.info("ssubscribe on %s failed (the link reconnects): %s", link.node, exc)

    def _link(self, node: str) -> _Link:
        link = self._links.get(node)
        if link is None:
            assert self._tg is not None, "start the subscriber first"
            link = _Link(node)
            self._links[node] = link
            link.task = self._tg.create_task(self._run_link(link), name=f"ssub:{node}")
        return link

    def _interrupt(self, channels: Iterable[str]) -> None:
        for channel in channels:
            state = self._channels.get(channel)
            if state is not None and state.active:
                state.active = False
                self._on_interrupted(channel)

    async def _reroute(self, channels: list[str]) -> None:
        """The channels' subscriptions are gone: read the slot map again and place them anew."""
        if not channels:
            return
        try:
            await self._topology.refresh()
        except REDIS_ERRORS as exc:
            log.info("slot map not refreshed (%s); keeping the last one", exc)
        await self._place(channels)

    def _retire(self, link: _Link) -> bool:
        """Forget a link without channels to a node that is no longer a primary."""
        if link.channels or self._topology.is_primary(link.node):
            return False
        if self._links.get(link.node) is link:
            del self._links[link.node]
        return True

    # -- tasks -------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._started.set()
            while True:
                await asyncio.sleep(PLACE_RETRY)
                if self._homeless:
                    async with self._lock:
                        await self._reroute(sorted(self._homeless))

    async def _run_link(self, link: _Link) -> None:
        delay = 0.1
        while True:
            try:
                pubsub = self._topology.client(link.node).pubsub()
                await pubsub.connect()
                async with self._lock:
                    link.pubsub = pubsub
                    link.pending.clear()
                    link.leaving.clear()
                    await self._send_subscribe(link, sorted(link.channels))
                delay = 0.1
                await self._read(link)
                return  # retired
            except REDIS_ERRORS as exc:
                self._on_error(exc)
                log.warning("subscription connection to %s lost: %r", link.node, exc)
            except Exception:
                # A bug must not end the subscriptions of this node for good.
                log.exception("subscription link to %s failed", link.node)
            async with self._lock:
                await _close(link.pubsub)
                link.pubsub = None
                lost = sorted(link.channels)
                self._interrupt(lost)
                await self._reroute(lost)
                if self._retire(link):
                    return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, MAX_RECONNECT_DELAY)

    async def _read(self, link: _Link) -> None:
        """Deliver messages until the connection fails (raises) or the link is retired."""
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while True:
            message = await link.pubsub.get_message(timeout=1.0)
            if message is None:
                if loop.time() - quiet_since >= IDLE_PING:  # silence may be a dead peer
                    async with asyncio.timeout(PING_TIMEOUT):
                        await link.pubsub.ping()
                    quiet_since = loop.time()
                continue
            quiet_since = loop.time()
            kind = reply_text(message.get("type"))
            channel = reply_text(message.get("channel"))
            if kind == "smessage":
                if channel in link.channels:
                    self._on_message(channel, message["data"])
                # Buffered messages come without awaiting the socket: let others run.
                await asyncio.sleep(0)
            elif kind == "ssubscribe":
                self._on_subscribed(link, channel)
            elif kind == "sunsubscribe" and await self._on_unsubscribed(link, channel):
                await _close(link.pubsub)
                link.pubsub = None
                return

    def _on_subscribed(self, link: _Link, channel: str) -> None:
        if link.pending[channel] > 0:
            link.pending[channel] -= 1
            if link.pending[channel] > 0:
                return  # a later SSUBSCRIBE of ours is still on its way
            again = False
        else:
            # Subscribed again by the client library after a reconnect of its own: messages
            # published while it was away were missed.
            again = True
        state = self._channels.get(channel)
        if state is None or channel not in link.channels or (state.active and not again):
            return
        resumed = again or state.ever
        state.active = state.ever = True
        self._on_active(channel, resumed)

    async def _on_unsubscribed(self, link: _Link, channel: str) -> bool:
        """A SUNSUBSCRIBE reply: ours, or the node's notice that the channel's slot moved
        away. Returns True when the link is left without use and retires."""
        if link.leaving[channel] > 0:
            link.leaving[channel] -= 1
            return False
        async with self._lock:
            if channel not in link.channels:
                return False
            log.info("%s: its hash slot moved away from %s", channel, link.node)
            self._interrupt([channel])
            await self._reroute([channel])
            return self._retire(link)


async def _close(pubsub: Any) -> None:
    if pubsub is not None:
        with contextlib.suppress(*REDIS_ERRORS):
            await pubsub.aclose()
