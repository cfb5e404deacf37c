"""One publisher per worker: the readers' ``publish.lua`` calls, sent together.

A reader hands its batch of parsed events to :meth:`Publisher.publish` and waits for the
script's reply, as it would for its own call. The publisher sends every call waiting at that
moment in one pipeline per Redis node (:func:`listenerpool.scripts.call_many`), then the calls
that came in while that round trip was on its way, and so on: one send and one reply parse
for all busy sessions of a pass, instead of a round trip per session. Each reader has at most
one call waiting (it waits for the reply before it publishes again), so a session's batches
go out in order; fencing and the expected-seq check stay in the script.

A second instance batches the readers' state reports (``report.lua``) the same way: a worker
taking thousands of sessions over at once reports each one ``listening``.

On a single server or a Sentinel's primary each publisher sends its rounds on a connection of
its own (:class:`workers.script_channel.ScriptChannel`), not through redis-py's pipelines: at
one or two calls a round, the pipeline's own work was most of a round's cost.

Either way a round whose replies have not come within ``reply_timeout`` fails its calls with
:class:`redis.exceptions.TimeoutError` and its connection is dropped, so that a Redis gone
without closing the connection cannot hold every later round of the worker behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from redis.commands.core import AsyncScript

from listenerpool.scripts import Call, Scripts, Settled, call_many
from workers.script_channel import DEFAULT_REPLY_TIMEOUT, ScriptChannel, no_reply_within

# Calls per round: bounds one pipeline's reply (and the time the loop spends parsing it).
MAX_CALLS = 1000


class PublisherStopped(redis.exceptions.ConnectionError):
    """The worker's publisher stopped before it could send this call (the worker is
    stopping). A connection error to the reader: it backs off, and is being stopped anyway."""


class Publisher:
    """Batches the ``publish.lua`` calls (or those of ``script``) of every reader of one
    worker; run :meth:`run` as a task for as long as readers call it."""

    def __init__(
        self,
        redis: Any,
        scripts: Scripts,
        *,
        script: AsyncScript | None = None,
        channel: ScriptChannel | None = None,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
    ) -> None:
        self._redis = redis
        self._script = script if script is not None else scripts.publish
        self._reply_timeout = reply_timeout
        #: Where the rounds go: a connection of this publisher's own where ``redis`` allows
        #: one (:meth:`ScriptChannel.of`), else ``redis``'s pipelines.
        self.channel = (
            channel if channel is not None else ScriptChannel.of(redis, reply_timeout=reply_timeout)
        )
        self._waiting: list[tuple[Call, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._stopped = False
        #: Rounds sent and calls they carried, for the worker's metrics and the benches.
        self.rounds = 0
        self.calls = 0

    async def call(self, keys: Sequence[str], args: Sequence[str | int]) -> int:
        """Run the script with ``keys`` and ``args`` in the next round; its reply.

        Raises what the call met (a Redis connection or timeout error, a script error), or
        :class:`PublisherStopped`. A caller cancelled before the round goes out is left out
        of it."""
        if self._stopped:
            raise PublisherStopped("the worker's publisher has stopped")
        reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append(((keys, args), reply))
        self._wake.set()
        return await reply

    async def run(self) -> None:
        """Send rounds until cancelled; then every call still waiting fails with
        :class:`PublisherStopped`."""
        in_flight: list[asyncio.Future[int]] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch = [(call, reply) for call, reply in self._waiting if not reply.done()]
                self._waiting = batch[MAX_CALLS:]
                batch = batch[:MAX_CALLS]
                if self._waiting:
                    self._wake.set()
                if not batch:
                    continue
                in_flight = [reply for _, reply in batch]
                await self._send(batch)
                in_flight = []
        finally:
            self._stopped = True
            if self.channel is not None:
                self.channel.close()
            stopped = PublisherStopped("the worker's publisher stopped")
            for reply in [*in_flight, *(reply for _, reply in self._waiting)]:
                if not reply.done():
                    reply.set_exception(stopped)
            self._waiting = []

    async def _send(self, batch: list[tuple[Call, asyncio.Future[int]]]) -> None:
        def settled(positions: Sequence[int], replies: Sequence[Any]) -> None:
            # Each reader gets its reply as soon as its node answered, not when the slowest
            # node of the round did.
            for position, value in zip(positions, replies, strict=True):
                reply = batch[position][1]
                if reply.done():
                    continue
                if isinstance(value, BaseException):
                    reply.set_exception(value)
                else:
                    reply.set_result(int(value))

        self.rounds += 1
        self.calls += len(batch)
        try:
            calls = [c for c, _ in batch]
            if self.channel is not None:  # the channel keeps the deadline itself
                await call_many(self._redis, self._script, calls, settled, send=self.channel.send)
            else:
                await self._pipelined(calls, settled)
        except Exception as exc:  # handed to the callers: it is their calls' error
            # Errors of single calls were settled above; a round that failed as a whole (the
            # connection lost, say) fails every call it left without a reply.
            for _, reply in batch:
                if not reply.done():
                    reply.set_exception(exc)

    async def _pipelined(self, calls: list[Call], settled: Settled) -> None:
        try:
            # redis-py drops a connection whose read is cancelled, so nothing stale is left.
            async with asyncio.timeout(self._reply_timeout):
                await call_many(self._redis, self._script, calls, settled)
        except TimeoutError:
            raise no_reply_within(self._reply_timeout) from None
