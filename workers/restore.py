"""Re-asserting held sessions after Redis lost its data.

A Redis restarted without persistence (or a failover to an empty replica) forgets every spec,
lease and stream. The renew and publish scripts then answer "spec gone" instead of "not owner",
and the worker that still runs a session's reader writes it back (``reassert.lua``): its index
entries first, then spec, lease and state, at an epoch above the one it held, with seq
continuing from the last publish Redis confirmed, so clients' ``after`` stays meaningful.

Only a reader whose lease clock has not run out may re-assert: by the self-fence rule at most
one worker in the fleet is in that position for a session, so the fleet re-asserts each running
session once, and sessions without a running reader at the moment of the loss stay lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from listenerpool import index
from listenerpool.scripts import Scripts, call_many
from workers.session import HeldSession

BATCH = 10  # scripts per pipeline: each carries up to LP_RESTORE_EVENTS events to encode


async def reassert_all(
    redis: Any,
    scripts: Scripts,
    sessions: Sequence[HeldSession],
    worker_id: str,
    ttl_ms: int,
    *,
    maxlen: int = 10_000,
    history_ttl_ms: int = 86_400_000,
) -> list[int | None]:
    """Re-assert every session in ``sessions``; per session the epoch now held, or None when
    another holder (or a newer epoch) owns it and the reader must stop.

    The sessions' recent events go back into their history streams (trimmed to ``maxlen``,
    expiring after ``history_ttl_ms`` without events). Does not change the sessions: the
    caller adopts the new epochs. Raises the Redis client's connection errors when the round
    cannot complete.
    """
    epochs: list[int | None] = []
    for start in range(0, len(sessions), BATCH):
        batch = sessions[start : start + BATCH]
        # The index buckets lost their entries too (on a cluster they may sit on a shard that
        # kept them). Written first, as for a claim: a lease created below without its entry
        # (the next call failing) would never be found by a reconciler once it lapses. An
        # entry for a session that turns out to be someone else's is stale and harmless.
        await index.track(
            redis, scripts, {s.sid: ttl_ms for s in batch}, listing=index.Listing.ENSURE
        )
        replies = await call_many(
            redis,
            scripts.reassert,
            [
                (
                    [s.keys.spec, s.keys.lease, s.keys.state, s.keys.events],
                    [s.lease_value, s.epoch, ttl_ms, s.spec.url, s.spec.headers_json(), s.seq,
                     s.last_id, worker_id, s.phase, maxlen, history_ttl_ms, s.spec_rev,
                     *_recent_args(s)],
                )
                for s in batch
            ],
        )  # fmt: skip
        epochs.extend(int(r[1]) if int(r[0]) == 1 else None for r in replies)
        # Encoding thousands of events is CPU work on the worker's one loop: let the renewal
        # round and the readers in between batches, or their leases run out meanwhile.
        await asyncio.sleep(0)
    return epochs


def _recent_args(s: HeldSession) -> list[str | int]:
    args: list[str | int] = []
    for event in s.recent or ():
        args += [event.seq, event.epoch, event.type, event.data, event.id]
    return args
