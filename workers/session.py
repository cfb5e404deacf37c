"""What a worker knows about one session it holds: identity, lease and upstream spec."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from listenerpool.keys import SessionKeys
from listenerpool.lease import LeaseClock
from listenerpool.replies import reply_text
from listenerpool.spec import UpstreamSpec


class RecentEvent(NamedTuple):
    seq: int
    epoch: int
    type: str
    data: str
    id: str


@dataclass(slots=True)
class HeldSession:
    """A session whose lease this worker holds (value ``<worker_id>:<token>``) at ``epoch``,
    reading the upstream ``spec`` at revision ``spec_rev`` (renewals report a newer one).

    ``seq`` and ``last_id`` are the position of the last publish Redis confirmed (or that the
    reader read back on connecting), and ``phase`` the state the reader last reported: what a
    re-assertion writes back after Redis lost its data, together with ``recent``: the last
    events published (up to ``LP_RESTORE_EVENTS``; None until the first publish, so idle
    sessions cost nothing), put back into the history so that clients a little behind at the
    moment of the loss still find them. ``position_fresh``: ``seq`` and ``last_id`` were just
    read by the adoption, in the script that took the lease (no publish can have moved them
    since), so the reader's first connection need not read them again.
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
    spec_rev: int = 0
    position_fresh: bool = False

    def remember(
        self, first_seq: int, epoch: int, events: list[tuple[str, str, str]], keep: int
    ) -> None:
        """Keep published ``(type, data, id)`` events numbered from ``first_seq``."""
        if keep <= 0:
            return
        if self.recent is None:
            self.recent = deque(maxlen=keep)
        for offset, (event_type, data, uid) in enumerate(events):
            self.recent.append(RecentEvent(first_seq + offset, epoch, event_type, data, uid))

    @property
    def sid(self) -> str:
        return self.keys.sid

    def remember_history(self, entries: Any, keep: int, *, after: int, upto: int) -> None:
        """Remember the events of a history read (``XREVRANGE``: newest first) whose seq is
        above ``after`` and at most ``upto``."""
        for _, fields in reversed(entries):
            f = {reply_text(name): reply_text(value) for name, value in fields.items()}
            try:
                seq, epoch = int(f["seq"]), int(f["epoch"])
            except (KeyError, ValueError):
                continue
            if after < seq <= upto:
                self.remember(
                    seq, epoch, [(f.get("event", ""), f.get("data", ""), f.get("uid", ""))], keep
                )
