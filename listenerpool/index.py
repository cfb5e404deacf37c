"""The session indexes: lease deadlines (read by the reconciler) and the listing, in buckets.

Each session's index entries live in bucket ``crc32(sid) % INDEX_BUCKETS``, a pair of sorted
sets with their own hash tag (``lp:{ix.<n>}:leases`` and ``lp:{ix.<n>}:sessions``), so the
indexes spread over a cluster's shards and no script touches both a session's keys and an
index. Index writes are therefore separate commands, ordered so that a crash between two steps
can only leave an index entry that is stale, never a lease the reconciler cannot find:

- an entry is written *before* the script that may create a lease that needs it (a claim), or
  *after* the script that confirmed how long the lease lasts (adoption, which cuts a claim's
  long unadopted lease to one TTL; renewal; the reconciler's claim);
- a deadline written after a script can be at most that lease's remaining time late, so a
  race with another writer delays a failover by at most one TTL and never loses it;
- entries are removed only by the reconciler, for sessions it found not desired (or failed),
  and only if the entry still has the score it read (``untrack.lua``): a claim made in
  between wrote a later deadline first, and its entry stays.

A bucket can be lost on its own: on a cluster it lives on another shard than most of its
sessions, and a shard brought back empty takes it while the sessions' keys stay. Each bucket
therefore has a marker (``lp:{ix.<n>}:intact``); a reconciler that finds one missing scans the
primaries for every session's spec and re-tracks those of that bucket (:func:`rebuild`), so a
desired session whose holder stopped meanwhile is not forgotten. Renewals and re-assertions
put back the entries of sessions still held; only the rebuild finds the others.

Every function takes the asyncio client and its :class:`~listenerpool.scripts.Scripts`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from listenerpool import keys
from listenerpool.replies import reply_text
from listenerpool.scripts import Call, Scripts, Send, call_many

REBUILD_CLAIM_MS = 120_000  # how long one caller owns a lost bucket's rebuild
REBUILD_SCAN_COUNT = 1000  # keys per SCAN reply
REBUILD_TRACK_BATCH = 500  # sessions per track round trip
INTACT = "intact"  # a bucket's marker once it is known to hold every entry it should


def markers_of_an_empty_redis() -> dict[str, str]:
    """Every bucket's marker, for writing into a Redis that has just started empty (the
    embedded one of single-node mode): it has lost nothing, and without them a reconciler
    would scan it and re-track whatever was claimed before its first round, and say so as
    if a bucket had been lost."""
    return {keys.index_intact(bucket): INTACT for bucket in range(keys.INDEX_BUCKETS)}


class Listing(StrEnum):
    """What a write does to the listing index (sid -> last update)."""

    KEEP = ""  # leave it alone
    TOUCH = "touch"  # the session was updated now
    ENSURE = "ensure"  # add it if missing (after Redis lost the index), else leave it


@dataclass(frozen=True, slots=True)
class DueEntry:
    """A lease index entry whose deadline has passed, with its score as stored."""

    sid: str
    score: bytes | str


@dataclass(frozen=True, slots=True)
class DueView:
    """What the reconciler sees in the lease index: entries due now, and the time until the
    earliest deadline (None when no session is tracked)."""

    entries: list[DueEntry]
    next_due_in: float | None
    more: bool  # some bucket had more due entries than the limit
    lost: list[int]  # buckets whose marker is missing: lost since they were last rebuilt


async def track(
    redis: Any,
    scripts: Scripts,
    dues: Mapping[str, int | None],
    *,
    listing: Listing = Listing.KEEP,
    send: Send | None = None,
) -> None:
    """Set each session's lease deadline to now + its ``due_ms`` (None: leave it alone) and
    update its listing entry; one script call per bucket, pipelined (or through ``send``, as
    :func:`~listenerpool.scripts.call_many` takes it)."""
    by_bucket: dict[int, list[str]] = defaultdict(list)
    for sid, due_ms in dues.items():
        by_bucket[keys.index_bucket(sid)] += [sid, "" if due_ms is None else str(max(0, due_ms))]
    calls: list[Call] = [
        ([keys.lease_index(bucket), keys.sessions_index(bucket)], [listing.value, *args])
        for bucket, args in sorted(by_bucket.items())
    ]
    await call_many(redis, scripts.track, calls, send=send)


async def due(redis: Any, scripts: Scripts, *, limit: int) -> DueView:
    """Up to ``limit`` due entries from each bucket, the time to the next deadline, and the
    buckets that were lost. Each bucket is judged by the clock of the server that holds it."""
    calls: list[Call] = [
        ([keys.lease_index(b), keys.index_intact(b)], [limit]) for b in range(keys.INDEX_BUCKETS)
    ]
    replies = await call_many(redis, scripts.due, calls)
    entries: list[DueEntry] = []
    next_in: float | None = None
    more = False
    lost: list[int] = []
    for bucket, reply in enumerate(replies):
        now_ms, first, marker, *pairs = reply
        if reply_text(first):
            wait = max(0.0, (float(reply_text(first)) - int(now_ms)) / 1000)
            next_in = wait if next_in is None else min(next_in, wait)
        if not reply_text(marker):
            lost.append(bucket)
        for i in range(0, len(pairs), 2):
            entries.append(DueEntry(reply_text(pairs[i]), pairs[i + 1]))
        more = more or (limit > 0 and len(pairs) >= 2 * limit)
    return DueView(entries, next_in, more, lost)


async def rebuild(redis: Any, scripts: Scripts, buckets: Sequence[int]) -> int | None:
    """Re-track every session of the lost ``buckets``: their lease deadlines due now (the
    reconciler then claims those nobody holds and re-tracks the others at their lease's
    remaining time) and their listing entries if missing.

    Scans every primary for specs, O(keys in Redis): it runs once per bucket lost. Buckets
    another caller is rebuilding are left to it (the marker reads ``rebuilding`` for
    ``REBUILD_CLAIM_MS``, so a caller that dies half-way leaves the rebuild to the next).
    A bucket lost again during the rebuild keeps its marker missing and is rebuilt again.
    Returns how many sessions were re-tracked; None when every bucket was another's.
    """
    async with redis.pipeline(transaction=False) as pipe:
        for bucket in buckets:
            pipe.set(keys.index_intact(bucket), "rebuilding", nx=True, px=REBUILD_CLAIM_MS)
        mine = [b for b, ok in zip(buckets, await pipe.execute(), strict=True) if ok]
    if not mine:
        return None
    wanted = set(mine)
    found: dict[str, int | None] = {}
    tracked = 0
    # A cluster client scans every primary in turn; SCAN may return a key twice, which only
    # writes the same entry again.
    async for key in redis.scan_iter(match=keys.SPEC_PATTERN, count=REBUILD_SCAN_COUNT):
        sid = keys.session_of_spec(key)
        if sid is not None and keys.index_bucket(sid) in wanted:
            found[sid] = 0
        if len(found) >= REBUILD_TRACK_BATCH:
            await track(redis, scripts, found, listing=Listing.ENSURE)
            tracked += len(found)
            found = {}
    await track(redis, scripts, found, listing=Listing.ENSURE)
    tracked += len(found)
    async with redis.pipeline(transaction=False) as pipe:
        for bucket in mine:
            pipe.set(keys.index_intact(bucket), INTACT, xx=True)
        await pipe.execute()
    return tracked


async def untrack(redis: Any, scripts: Scripts, entries: Sequence[DueEntry]) -> int:
    """Drop stale entries the reconciler read (each only if unchanged since); how many went."""
    by_bucket: dict[int, list[bytes | str]] = defaultdict(list)
    for entry in entries:
        bucket = keys.index_bucket(entry.sid)
        by_bucket[bucket] += [entry.sid, entry.score]
    calls: list[Call] = [([keys.lease_index(b)], args) for b, args in sorted(by_bucket.items())]
    return sum(int(r) for r in await call_many(redis, scripts.untrack, calls))


async def drop_foreign(redis: Any, entries: Sequence[DueEntry]) -> None:
    """Remove entries that are not session ids (never written by the pool); the reconciler
    would otherwise meet them every round."""
    if not entries:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.zrem(keys.lease_index(keys.index_bucket(entry.sid)), entry.sid)
        await pipe.execute()


async def list_recent(redis: Any, offset: int, limit: int) -> tuple[list[str], int]:
    """Session ids most recently updated first, ``limit`` from ``offset``, and how many
    sessions the listing holds. Merges the buckets: costs O(buckets * (offset + limit))."""
    async with redis.pipeline(transaction=False) as pipe:
        for bucket in range(keys.INDEX_BUCKETS):
            pipe.zrevrange(keys.sessions_index(bucket), 0, offset + limit - 1, withscores=True)
        for bucket in range(keys.INDEX_BUCKETS):
            pipe.zcard(keys.sessions_index(bucket))
        replies = await pipe.execute()
    ranges, counts = replies[: keys.INDEX_BUCKETS], replies[keys.INDEX_BUCKETS :]
    merged = sorted(
        ((-float(score), reply_text(member)) for bucket in ranges for member, score in bucket)
    )
    return [sid for _, sid in merged[offset : offset + limit]], sum(int(c) for c in counts)
