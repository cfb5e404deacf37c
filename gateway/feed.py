"""One client's gap-free, duplicate-free sequence of a session's events.

The join: subscribe first (the hub confirms the subscription), then read the history stream
after the client's seq, then deliver live envelopes with seq > last sent. A seq gap on the live
path, or a catch-up request from the hub, is filled from the stream. If the client's seq is
older than the retained history, a reset notice says where the history now starts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from gateway.hub import CATCH_UP, FanoutHub, Live, Overflowed, QueueBudget, Subscriber
from listenerpool.envelope import Envelope
from listenerpool.keys import SessionKeys

PAGE = 1000  # history entries per XRANGE


@dataclass(frozen=True, slots=True)
class EventFrame:
    seq: int
    raw: str  # the envelope JSON, as published

    def envelope(self) -> Envelope:
        return Envelope.from_json(self.raw)


@dataclass(frozen=True, slots=True)
class ResetFrame:
    """The client's position is older than the history: events ``after+1 .. first_seq-1`` are
    gone. Delivery continues from ``first_seq``."""

    after: int
    first_seq: int


Frame = EventFrame | ResetFrame


class ClientTooSlow(Exception):
    """The client's queue overflowed: it must reconnect and resume by seq."""


class SessionFeed:
    """Frames for one client from seq ``after`` (exclusive). Use as an async context manager
    (it joins the hub on enter and leaves on exit), then iterate :meth:`frames`. ``budget``
    bounds its live queue together with others' (the sessions of one connection)."""

    def __init__(
        self,
        hub: FanoutHub,
        redis: Any,
        sid: str,
        after: int,
        budget: QueueBudget | None = None,
    ) -> None:
        self._hub = hub
        self._budget = budget
        self._redis = redis
        self._keys = SessionKeys(sid)
        self.last = max(0, after)
        self._sub: Subscriber | None = None
        self._send_now: Callable[[bytes, bytes], bool] | None = None

    async def __aenter__(self) -> SessionFeed:
        # Kept before the join's awaits, so an exit after a cancelled enter still leaves.
        self._sub = self._hub.subscriber(self._keys.sid, self._budget)
        try:
            await self._hub.attach(self._sub)
        except Exception:
            sub, self._sub = self._sub, None
            await self._hub.leave(sub)  # idempotent
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            await self._hub.leave(self._sub)
            self._sub = None

    def deliver_directly(self, send_text_now: Callable[[bytes, bytes], bool]) -> None:
        """While :meth:`frames` waits for live events, write the next one in order straight to
        the client with ``send_text_now`` (False: it could not take it now; the event is then
        queued and yielded as usual). The hub counts what it writes. Call after entering."""
        assert self._sub is not None, "enter the feed first"
        self._send_now = send_text_now
        self._sub.direct = self._deliver_now

    def _deliver_now(self, item: Live) -> bool:
        # Anything but the next seq (a gap to fill, a repeat to drop) is frames()' to handle.
        if item.seq != self.last + 1 or self._send_now is None:
            return False
        if not self._send_now(item.utf8, item.frame):
            return False
        self.last = item.seq
        return True

    @property
    def overflowed(self) -> Any:
        """An event set when the client fell behind (for the transport to stop sending)."""
        assert self._sub is not None
        return self._sub.overflowed

    async def frames(self) -> AsyncIterator[Frame]:
        assert self._sub is not None, "enter the feed first"
        async for frame in self._from_history(until=None):
            yield frame
        while True:
            try:
                item = await self._sub.get()
            except Overflowed:
                raise ClientTooSlow from None
            if item is CATCH_UP:
                async for frame in self._from_history(until=None):
                    yield frame
                continue
            assert isinstance(item, Live)
            if item.seq <= self.last:
                continue
            if item.seq > self.last + 1:
                async for frame in self._from_history(until=item.seq - 1):
                    yield frame
                if item.seq <= self.last:
                    continue
                if item.seq > self.last + 1:  # the missing range is no longer in the history
                    yield ResetFrame(self.last, item.seq)
            self.last = item.seq
            yield EventFrame(item.seq, item.raw)

    async def _from_history(self, *, until: int | None) -> AsyncIterator[Frame]:
        """Stream entries after ``self.last`` (up to ``until``), announcing a reset first when
        the history no longer reaches back to ``self.last + 1``."""
        end = f"{until}-0" if until is not None else "+"
        first_page = True
        while True:
            entries = await self._redis.xrange(
                self._keys.events, f"{self.last + 1}-0", end, count=PAGE
            )
            if first_page and entries:
                first_seq = _seq(entries[0][0])
                if first_seq > self.last + 1:
                    yield ResetFrame(self.last, first_seq)
            first_page = False
            for entry_id, fields in entries:
                seq = _seq(entry_id)
                if seq <= self.last:
                    continue
                self.last = seq
                yield EventFrame(seq, Envelope.from_stream_entry(fields).to_json())
            if len(entries) < PAGE:
                return


def _seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])
