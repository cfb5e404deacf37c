"""What a worker knows about one session it holds: identity, lease and upstream spec."""

from __future__ import annotations

from dataclasses import dataclass

from listenerpool.keys import SessionKeys
from listenerpool.lease import LeaseClock
from listenerpool.spec import UpstreamSpec


@dataclass(slots=True)
class HeldSession:
    """A session whose lease this worker holds (value ``<worker_id>:<token>``) at ``epoch``."""

    keys: SessionKeys
    token: str
    epoch: int
    lease_value: str
    spec: UpstreamSpec
    clock: LeaseClock

    @property
    def sid(self) -> str:
        return self.keys.sid
