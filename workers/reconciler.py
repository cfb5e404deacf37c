"""Re-claim desired sessions whose lease lapsed. Costs O(expired leases), not O(sessions): lease
deadlines live in a sorted set and only its expired range is read. The same set says when the
next lease is due, so a reconciler can wake then instead of up to a period later."""

from __future__ import annotations

import logging
from typing import Any

from listenerpool import keys
from listenerpool.control import SessionControl

log = logging.getLogger(__name__)

BATCH = 500
MAX_ROUNDS = 20  # bounds one call; whatever is left is due again next period


async def reconcile_once(redis: Any, control: SessionControl, *, limit: int = BATCH) -> int:
    """Claim (and enqueue) every session whose lease deadline has passed, ``limit`` at a time.

    Safe to run on every worker at once: the claim script lets exactly one caller win.
    Returns how many sessions this call claimed.
    """
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    claimed = 0
    for _ in range(MAX_ROUNDS):
        due = await redis.zrangebyscore(keys.LEASE_DEADLINES, "-inf", now_ms, start=0, num=limit)
        sids = []
        for raw in due:
            sid = raw.decode() if isinstance(raw, bytes) else str(raw)
            if keys.SESSION_ID_PATTERN.fullmatch(sid):
                sids.append(sid)
            else:  # never written by us; it would otherwise be retried forever
                await redis.zrem(keys.LEASE_DEADLINES, raw)
        won = await control.reclaim_many(sids)
        for sid, epoch in won.items():
            log.info(
                "session %s: lease had lapsed; re-claimed at epoch %d",
                sid,
                epoch,
                extra={"session": sid, "epoch": epoch, "state": "reclaimed"},
            )
        claimed += len(won)
        if len(due) < limit:
            break
    return claimed


async def next_due_in(redis: Any) -> float | None:
    """Seconds until the earliest lease deadline (0 when one is already due), by Redis's clock;
    None when no lease is tracked. One round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.zrange(keys.LEASE_DEADLINES, 0, 0, withscores=True)
        (seconds, micros), first = await pipe.execute()
    if not first:
        return None
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return max(0.0, (float(first[0][1]) - now_ms) / 1000)
