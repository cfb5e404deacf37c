"""Re-claim desired sessions whose lease lapsed. Costs O(expired leases), not O(sessions): lease
deadlines live in a sorted set and only its expired range is read."""

from __future__ import annotations

import logging
from typing import Any

from listenerpool import keys
from listenerpool.control import SessionControl
from listenerpool.errors import InvalidSessionId

log = logging.getLogger(__name__)


async def reconcile_once(redis: Any, control: SessionControl, *, limit: int = 500) -> int:
    """Claim (and enqueue) up to ``limit`` sessions whose lease deadline has passed.

    Safe to run on every worker at once: the claim script lets exactly one caller win.
    Returns how many sessions this call claimed.
    """
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    due = await redis.zrangebyscore(keys.LEASE_DEADLINES, "-inf", now_ms, start=0, num=limit)
    claimed = 0
    for raw in due:
        sid = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:
            epoch = await control.reclaim(sid)
        except InvalidSessionId:
            # Never written by us; a foreign entry would otherwise be retried forever.
            await redis.zrem(keys.LEASE_DEADLINES, raw)
            continue
        if epoch is not None:
            claimed += 1
            log.info("session %s: lease had lapsed; re-claimed at epoch %d", sid, epoch)
    return claimed
