"""Clients that follow sessions through a gateway with :class:`PoolClient` and record every
event they get, for integration tests and soak runs to compare with what the upstream sent.

A follower resumes by seq across any disconnection (the client does that). It also retries a
refusal as "unknown session" (404): after Redis lost its data a session is unknown until the
worker running it has re-asserted it, which takes up to one lease renewal interval.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from listenerpool.client import Event, PoolClient, PoolClientError, Reset
from listenerpool.tasks import cancel_until_done
from listenerpool.testing.upstream import SSEUpstream

__all__ = ["Follower", "Received"]

UNKNOWN_RETRY = 0.2  # seconds between attempts while the session is unknown


@dataclass(frozen=True, slots=True)
class Received:
    """One event as a client saw it: its seq, the publishing epoch and the upstream's number."""

    seq: int
    epoch: int
    number: int


@dataclass(slots=True)
class Follower:
    """Follows ``sid`` through the gateway at ``base`` from seq ``after`` until stopped."""

    base: str
    sid: str
    after: int = 0
    max_reconnect_delay: float = 1.0
    received: list[Received] = field(default_factory=list)
    resets: list[Reset] = field(default_factory=list)
    refusals: int = 0  # "unknown session" answers retried
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"follow:{self.sid}")

    async def stop(self) -> None:
        """Stop following (the WebSocket is closed); raises what ended the follower early."""
        if self._task is None:
            return
        task, self._task = self._task, None
        if task.done():
            task.result()
        await cancel_until_done(task)

    @property
    def last_seq(self) -> int:
        return self.received[-1].seq if self.received else self.after

    async def _run(self) -> None:
        async with PoolClient(self.base) as client:
            while True:
                stream = client.events(
                    self.sid,
                    after=self.last_seq,
                    reconnect_delay=min(0.1, self.max_reconnect_delay),
                    max_reconnect_delay=self.max_reconnect_delay,
                )
                try:
                    async for item in stream:
                        self._record(item)
                except PoolClientError as exc:
                    if exc.status != 404:
                        raise
                    self.refusals += 1
                finally:
                    with contextlib.suppress(Exception):
                        await stream.aclose()
                await asyncio.sleep(UNKNOWN_RETRY)

    def _record(self, item: Event | Reset) -> None:
        if isinstance(item, Reset):
            self.resets.append(item)
            return
        self.received.append(Received(item.seq, item.epoch, SSEUpstream.number_of(item.data)))
