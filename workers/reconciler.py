"""Re-claim desired sessions whose lease lapsed. Costs O(expired leases), not O(sessions): lease
deadlines live in sorted sets (one per index bucket, spread over a cluster's shards) and only
their expired ranges are read. The same sets say when the next lease is due, so a reconciler
can wake then instead of up to a period later. A bucket lost on its own (a cluster shard
brought back empty) is rebuilt from the specs first (:func:`listenerpool.index.rebuild`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from listenerpool import index, keys
from listenerpool.control import SessionControl
from listenerpool.logs import some_of
from workers.dispatch import ListenJob

log = logging.getLogger(__name__)

BATCH = 500  # entries per bucket per round
MAX_ROUNDS = 20  # bounds one call; whatever is left is due again next period


async def reconcile_once(
    redis: Any,
    control: SessionControl,
    *,
    limit: int = BATCH,
    room: Callable[[], int] = lambda: 0,
    adopt: Callable[[list[ListenJob]], Awaitable[None]] | None = None,
) -> int:
    """Claim (and enqueue) every session whose lease deadline has passed, ``limit`` per bucket
    at a time; drop the entries of sessions no longer desired. With ``adopt``, the calling
    worker adopts up to ``room()`` of the sessions it claims itself instead of enqueueing them
    (a failover then costs no queue round trips for them). ``room()`` is asked once per round,
    before its claims, and the caller keeps that much room for ``adopt``, which comes after
    the rest of the round's claims are enqueued.

    Safe to run on every worker at once: the claim script lets exactly one caller win.
    Returns how many sessions this call claimed.
    """
    claimed = 0
    for round_ in range(MAX_ROUNDS):
        view = await index.due(redis, control.scripts, limit=limit)
        if view.lost and round_ == 0:
            await _rebuild(redis, control, view.lost)
            view = await index.due(redis, control.scripts, limit=limit)
        seen = {}
        foreign = []
        for entry in view.entries:
            if keys.SESSION_ID_PATTERN.fullmatch(entry.sid):
                seen[entry.sid] = entry
            else:  # never written by us; it would otherwise be retried forever
                foreign.append(entry)
        await index.drop_foreign(redis, foreign)
        keep = max(0, room()) if adopt is not None else 0
        won, kept = await control.reclaim_keeping(list(seen), seen, keep=keep)
        _log_reclaimed(won, len(kept))
        claimed += len(won)
        if kept and adopt is not None:
            await adopt([ListenJob(sid, token, epoch) for sid, token, epoch in kept])
        if not view.more:
            break
    return claimed


def _log_reclaimed(won: dict[str, int], kept: int) -> None:
    """One INFO line for a round's re-claims (each session's at DEBUG)."""
    if not won:
        return
    for sid, epoch in won.items():
        log.debug(
            "session %s: lease had lapsed; re-claimed at epoch %d",
            sid,
            epoch,
            extra={"session": sid, "epoch": epoch, "state": "reclaimed"},
        )
    log.info(
        "re-claimed %d sessions whose lease had lapsed (%d adopted here, the rest queued): %s",
        len(won),
        kept,
        some_of(list(won)),
        extra={"state": "reclaimed", "count": len(won)},
    )


async def next_due_in(redis: Any, control: SessionControl) -> float | None:
    """Seconds until the earliest lease deadline (0 when one is already due, or a bucket was
    lost and needs rebuilding), by the clock of the Redis holding it; None when no lease is
    tracked. One pipelined round trip."""
    view = await index.due(redis, control.scripts, limit=0)
    return 0.0 if view.lost else view.next_due_in


async def _rebuild(redis: Any, control: SessionControl, lost: list[int]) -> None:
    tracked = await index.rebuild(redis, control.scripts, lost)
    if tracked is None:
        return  # another reconciler is rebuilding them
    # A Redis that starts empty has no markers either; only a rebuild that found sessions
    # says something was lost.
    log.log(
        logging.WARNING if tracked else logging.DEBUG,
        "index buckets %s had no marker: re-tracked %d sessions found in Redis",
        lost,
        tracked,
        extra={"state": "index-rebuilt"},
    )
