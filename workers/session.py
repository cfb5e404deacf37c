"""What a worker knows about one session it holds: identity, lease and upstream spec."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from listenerpool.keys import SessionKeys
from listenerpool.lease import LeaseClock
from listenerpool.replies import reply_text
from listenerpool.settings import Settings
from listenerpool.spec import UpstreamSpec


class RecentEvent(NamedTuple):
    seq: int
    epoch: int
    type: str
    data: str
    id: str


# Memory an event kept for the write-back takes beyond its text: the tuple, its two integers
# and three string headers, and its place in the deque. Measured: a worker holding 5,000
# sessions with 64 remembered events each (160 bytes of data, ~25 of type and id) grew by
# ~490 bytes per event.
EVENT_OVERHEAD = 300


class RecentLimit(NamedTuple):
    """How much of its recent events a held session keeps: at most ``events`` of them, and at
    most ``size`` bytes, each event counted as its type, data and id plus
    :data:`EVENT_OVERHEAD` (the oldest go first)."""

    events: int
    size: int

    @property
    def keeps_none(self) -> bool:
        return self.events <= 0 or self.size <= 0


def recent_limit(settings: Settings) -> RecentLimit:
    """``LP_RESTORE_EVENTS`` and ``LP_RESTORE_BYTES``."""
    return RecentLimit(settings.restore_events, settings.restore_bytes)


def event_size(event_type: str, data: str, uid: str) -> int:
    return len(event_type) + len(data) + len(uid) + EVENT_OVERHEAD


@dataclass(slots=True)
class HeldSession:
    """A session whose lease this worker holds (value ``<worker_id>:<token>``) at ``epoch``,
    reading the upstream ``spec`` at revision ``spec_rev`` (renewals report a newer one).

    ``seq`` and ``last_id`` are the position of the last publish Redis confirmed (or that the
    reader read back on connecting), and ``phase`` the state the reader last reported: what a
    re-assertion writes back after Redis lost its data, together with ``recent``: the last
    events published (within ``LP_RESTORE_EVENTS`` and ``LP_RESTORE_BYTES``, always the newest
    ones in a row; None until the first publish or the history read of an adoption, so
    sessions that never published cost nothing), put back into the history so that clients a
    little behind at the moment of the loss still find them. ``position_fresh``: ``seq`` and
    ``last_id`` were just read by the adoption, in the script that took the lease (no publish
    can have moved them since), so the reader's first connection need not read them again.
    """

    keys: SessionKeys
    token: str
    epoch: int
    lease_value: str
    spec: UpstreamSpec
    clock: LeaseClock
    seq: int = 0
    last_id: str = ""
    phase: str = "connecting"
    recent: deque[RecentEvent] | None = None
    recent_size: int = 0  # of ``recent``, as :func:`event_size` counts
    spec_rev: int = 0
    position_fresh: bool = False

    def remember(
        self, first_seq: int, epoch: int, events: list[tuple[str, str, str]], limit: RecentLimit
    ) -> None:
        """Keep published ``(type, data, id)`` events numbered from ``first_seq``, within
        ``limit``: the oldest kept go first, and an event larger than the whole size is not
        kept at all."""
        self._keep(
            [
                RecentEvent(first_seq + offset, epoch, event_type, data, uid)
                for offset, (event_type, data, uid) in enumerate(events)
            ],
            limit,
        )

    def _keep(self, events: list[RecentEvent], limit: RecentLimit) -> None:
        if limit.keeps_none or not events:
            return
        if self.recent is None:
            self.recent = deque()
        recent = self.recent
        for event in events:
            recent.append(event)
            self.recent_size += event_size(event.type, event.data, event.id)
            while recent and (len(recent) > limit.events or self.recent_size > limit.size):
                gone = recent.popleft()
                self.recent_size -= event_size(gone.type, gone.data, gone.id)

    @property
    def sid(self) -> str:
        return self.keys.sid

    def remember_history(self, entries: Any, limit: RecentLimit, *, after: int, upto: int) -> None:
        """Remember the events of a history read (``XREVRANGE``: newest first) whose seq is
        above ``after`` and at most ``upto``, as :meth:`remember` would keep them. Only the
        newest that fit in ``limit`` are decoded: a worker taking sessions over reads thousands
        of histories at once, and decoding every field of every entry was most of that."""
        if limit.keeps_none:
            return
        picked: list[RecentEvent] = []
        total = 0
        for _, fields in entries:
            event = _history_event(fields)
            if event is None or not after < event.seq <= upto:
                continue
            total += event_size(event.type, event.data, event.id)
            if len(picked) == limit.events or total > limit.size:
                break
            picked.append(event)
        picked.reverse()
        self._keep(picked, limit)


def _history_event(fields: Any) -> RecentEvent | None:
    """A history entry's fields (as ``publish.lua`` wrote them) as a :class:`RecentEvent`;
    None for an entry without a valid seq and epoch."""
    get = fields.get
    try:
        seq, epoch = int(get(b"seq")), int(get(b"epoch"))
    except (TypeError, ValueError):
        return None
    return RecentEvent(
        seq, epoch, reply_text(get(b"event")), reply_text(get(b"data")), reply_text(get(b"uid"))
    )
