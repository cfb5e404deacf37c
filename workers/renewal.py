"""Batched lease renewal and release: pipelined rounds of compare-and-set scripts."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any

from listenerpool import keys
from listenerpool.scripts import Scripts
from workers.session import HeldSession

BATCH = 1000  # scripts per pipeline flush: bounds one reply's size at 10,000 leases


class RenewVerdict(IntEnum):
    RENEWED = 1
    LOST = 0
    CANCELLED = -1
    GONE = -2  # the session's spec is gone: Redis lost its data (see workers.restore)


async def renew_all(
    redis: Any, scripts: Scripts, sessions: Sequence[HeldSession], ttl_ms: int
) -> list[RenewVerdict]:
    """Renew every lease in ``sessions``; one verdict per session, in order.

    Raises the Redis client's connection/timeout errors when the round cannot complete; the
    caller then leaves its lease clocks unconfirmed, which is what drives self-fencing.
    """
    verdicts: list[RenewVerdict] = []
    for start in range(0, len(sessions), BATCH):
        async with redis.pipeline(transaction=False) as pipe:
            for s in sessions[start : start + BATCH]:
                await scripts.renew(
                    keys=[s.keys.lease, s.keys.cancel, keys.LEASE_DEADLINES, s.keys.spec],
                    args=[s.lease_value, ttl_ms, s.sid, s.epoch],
                    client=pipe,
                )
            replies = await pipe.execute()
        verdicts.extend(RenewVerdict(int(r)) for r in replies)
    return verdicts


async def release_all(
    redis: Any, scripts: Scripts, sessions: Sequence[HeldSession], final: str, why: str
) -> int:
    """Give back every lease in ``sessions`` that is still ours; returns how many were.

    ``final`` is the state recorded (``handoff`` marks desired sessions due at once).
    """
    released = 0
    for start in range(0, len(sessions), BATCH):
        async with redis.pipeline(transaction=False) as pipe:
            for s in sessions[start : start + BATCH]:
                await scripts.release(
                    keys=[s.keys.lease, s.keys.spec, s.keys.state, keys.LEASE_DEADLINES],
                    args=[s.lease_value, s.sid, final, why],
                    client=pipe,
                )
            replies = await pipe.execute()
        released += sum(int(r) for r in replies)
    return released
