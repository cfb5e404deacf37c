"""Lease timing decisions as pure functions of (state, now); no I/O, injected monotonic clock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class LeaseClock:
    """When a held lease was last confirmed, and what that implies.

    ``confirmed_at`` is the monotonic time at which the last *successful* renewal was **sent**:
    Redis starts the new TTL no earlier than that, so fencing relative to the send time can never
    outlive the lease in Redis.
    """

    confirmed_at: float
    fence_after: float

    def confirm(self, sent_at: float) -> None:
        if sent_at > self.confirmed_at:
            self.confirmed_at = sent_at

    def must_fence(self, now: float) -> bool:
        """True once the reader must stop itself: its lease may be about to expire."""
        return now - self.confirmed_at >= self.fence_after

    def fence_deadline(self) -> float:
        return self.confirmed_at + self.fence_after
