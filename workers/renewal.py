"""Batched lease renewal and release: pipelined rounds of compare-and-set scripts, then the
sessions' lease index entries (see :mod:`listenerpool.index` for the order of the two)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any

from listenerpool import index
from listenerpool.keys import SessionKeys
from listenerpool.scripts import Scripts, Send, Settled, call_many
from workers.session import HeldSession

# Scripts per pipeline flush. Building a flush and parsing its replies holds the worker's loop,
# which its readers share: 1,000 at a time held it ~30 ms every round (an event arriving then
# waited as long), 100 ~3.5 ms, 50 under 2 ms; a round of 10,000 leases is 200 round trips.
BATCH = 50


class RenewVerdict(IntEnum):
    RENEWED = 1
    SPEC_CHANGED = 2  # renewed, and the stored spec is newer than the reader's: reconnect
    LOST = 0
    CANCELLED = -1
    GONE = -2  # the session's spec is gone: Redis lost its data (see workers.restore)


class ReleaseVerdict(IntEnum):
    NOT_OURS = 0
    DUE = 1  # released, and still desired: due for a new reader at once
    DONE = 2  # released, and not to be restarted


async def renew_all(
    redis: Any,
    scripts: Scripts,
    sessions: Sequence[HeldSession],
    ttl_ms: int,
    answered: Callable[[HeldSession, RenewVerdict], None] | None = None,
    *,
    send: Send | None = None,
) -> list[RenewVerdict]:
    """Renew every lease in ``sessions``; one verdict per session, in order. The renewed
    sessions' lease deadlines move on afterwards (and their listing entries are put back if
    Redis lost them). ``answered``, if given, is told each session's verdict as soon as Redis
    gave it: on a cluster a slow or failing shard then holds up only its own sessions.
    ``send``, on a single server, carries the flushes instead of ``redis``'s pipelines (the
    worker's lease channel).

    Raises the Redis client's connection/timeout errors when the round cannot complete; the
    caller then leaves its lease clocks unconfirmed, which is what drives self-fencing.
    """
    verdicts: list[RenewVerdict] = []
    for start in range(0, len(sessions), BATCH):
        batch = sessions[start : start + BATCH]

        replies = await call_many(
            redis,
            scripts.renew,
            [
                (
                    [s.keys.lease, s.keys.cancel, s.keys.spec],
                    [s.lease_value, ttl_ms, s.epoch, s.spec_rev],
                )
                for s in batch
            ],
            _tell(answered, batch),
            send=send,
        )
        round_verdicts = [RenewVerdict(int(r)) for r in replies]
        renewed = {
            s.sid: ttl_ms
            for s, v in zip(batch, round_verdicts, strict=True)
            if v in (RenewVerdict.RENEWED, RenewVerdict.SPEC_CHANGED)
        }
        await index.track(redis, scripts, renewed, listing=index.Listing.ENSURE, send=send)
        verdicts.extend(round_verdicts)
    return verdicts


def _tell(
    answered: Callable[[HeldSession, RenewVerdict], None] | None, batch: Sequence[HeldSession]
) -> Settled | None:
    """The ``settled`` hook of one batch's calls that tells ``answered`` each verdict."""
    if answered is None:
        return None

    def settled(positions: Sequence[int], replies: Sequence[Any]) -> None:
        for position, reply in zip(positions, replies, strict=True):
            if not isinstance(reply, Exception):
                answered(batch[position], RenewVerdict(int(reply)))

    return settled


async def release_all(
    redis: Any, scripts: Scripts, sessions: Sequence[HeldSession], final: str, why: str
) -> int:
    """Give back every lease in ``sessions`` that is still ours; returns how many were.

    ``final`` is the state recorded (``handoff`` marks desired sessions due at once).
    """
    released = 0
    for start in range(0, len(sessions), BATCH):
        batch = sessions[start : start + BATCH]
        verdicts = await release_many(
            redis, scripts, [(s.keys, s.lease_value) for s in batch], final, why
        )
        released += sum(v is not ReleaseVerdict.NOT_OURS for v in verdicts)
    return released


async def release_many(
    redis: Any, scripts: Scripts, leases: Sequence[tuple[SessionKeys, str]], final: str, why: str
) -> list[ReleaseVerdict]:
    """Release each ``(keys, lease_value)`` if still ours, then mark the released sessions due
    in the lease index (after the release: a reconciler looking before it would only find the
    lease still held): one still desired is claimed again at once, the entry of one that is
    not is dropped at once."""
    replies = await call_many(
        redis,
        scripts.release,
        [([k.lease, k.spec, k.state], [value, final, why]) for k, value in leases],
    )
    verdicts = [ReleaseVerdict(int(r)) for r in replies]
    due: dict[str, int | None] = {
        k.sid: 0
        for (k, _), v in zip(leases, verdicts, strict=True)
        if v is not ReleaseVerdict.NOT_OURS
    }
    await index.track(redis, scripts, due)
    return verdicts
