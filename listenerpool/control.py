"""The control operations the gateway (and tests, and the CLI) call: claim, cancel, status.

A claim takes the session's lease in one Lua script; only the winner enqueues a listen job, so
concurrent claims on any number of replicas yield one job and one reader. The scripts touch one
session's keys only; the session indexes are written around them (see :mod:`listenerpool.index`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from rq import Queue

from listenerpool import index, keys
from listenerpool.allowlist import check_host
from listenerpool.coalesce import Coalescer
from listenerpool.errors import InvalidInput, InvalidSessionId
from listenerpool.replies import reply_text
from listenerpool.scripts import Scripts, call_many
from listenerpool.settings import Settings
from listenerpool.spec import UpstreamSpec

LISTEN_JOB = "workers.dispatch.listen"
PENDING_TTL_FACTOR = 3
RECLAIM_BATCH = 500
CLAIM_BATCH = 500  # claims per pipeline (and per rq enqueue_many) of one claim_many call
UNASSIGNED = "-"  # owner part of a lease claimed but not yet adopted by a worker

_Checked = tuple[keys.SessionKeys, UpstreamSpec]  # a claim request past its checks


class ClaimOutcome(StrEnum):
    CREATED = "created"  # a new session: lease taken, job enqueued
    CLAIMED = "claimed"  # a known session without a reader: lease taken, job enqueued
    UNCHANGED = "unchanged"  # already running with this spec
    UPDATED = "updated"  # running; the reader reconnects with the new spec
    PENDING = "pending"  # a previous reader still holds the lease; the reconciler takes over


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One session to claim: listen to ``sid`` at ``url`` with these request headers."""

    sid: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClaimResult:
    outcome: ClaimOutcome
    epoch: int


@dataclass(frozen=True, slots=True)
class SessionStatus:
    sid: str
    url: str
    desired: bool
    state: str
    owner: str
    epoch: int
    seq: int
    retries: int
    last_error: str
    last_id: str
    lease_holder: str
    since_ms: int

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def control_message(op: str, sid: str) -> str:
    """A notice on the control channel (``lp:ctl``, sharded pub/sub)."""
    return json.dumps({"op": op, "sid": sid})


class SessionControl:
    """Claim, cancel and inspect sessions.

    ``redis`` is an asyncio Redis client; ``queue`` an rq queue (on a sync client to the same
    Redis, JSON serializer). Neither is closed by this object.
    """

    def __init__(self, redis: Any, queue: Queue, settings: Settings) -> None:
        self._redis = redis
        self._queue = queue
        self._settings = settings
        self._scripts = Scripts.register(redis)
        self._allow = settings.allowlist
        # A claimed lease waits, unrenewed, until a worker adopts its job; it gets more time
        # than a held lease so a burst of claims is not re-claimed while still queued.
        self._pending_ttl_ms = int(settings.lease_ttl * PENDING_TTL_FACTOR * 1000)
        # Single claims made at once (a gateway's concurrent PUTs) share their round trips.
        self._claims: Coalescer[_Checked, ClaimResult] = Coalescer(
            self._claim_batch, key=lambda checked: checked[0].sid, limit=CLAIM_BATCH
        )

    @property
    def scripts(self) -> Scripts:
        return self._scripts

    async def claim(
        self, sid: str, url: str, headers: Mapping[str, str] | None = None
    ) -> ClaimResult:
        """Declare that ``sid`` should be listened to at ``url``; idempotent.

        Raises :class:`~listenerpool.errors.InvalidSessionId` or
        :class:`~listenerpool.errors.InvalidUpstream` for bad input (its subclass
        :class:`~listenerpool.errors.UpstreamNotAllowed` for a host the allowlist clearly
        refuses, :class:`~listenerpool.errors.HeadersTooLarge` over the header limits), before
        touching Redis.

        Claims made at once on one event loop share their round trips: those asked for while
        a batch of them is under way go together in the next (as :meth:`claim_many`'s), with
        two claims of one session never in the same batch.
        """
        [checked] = self._checked([ClaimRequest(sid, url, dict(headers or {}))])
        return await self._claims.submit(checked)

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        """:meth:`claim` for many sessions, in a few round trips whatever their number (one
        pipeline of claims per Redis node, one batch of jobs). Every request is checked before
        Redis is touched: one bad request (or a session named twice) raises its error, with its
        position, and nothing is claimed. The results come in the requests' order."""
        specs = self._checked(requests)
        results: list[ClaimResult] = []
        for start in range(0, len(specs), CLAIM_BATCH):
            results += await self._claim_batch(specs[start : start + CLAIM_BATCH])
        return results

    def _checked(self, requests: Sequence[ClaimRequest]) -> list[_Checked]:
        """The requests' keys and specs; raises the first bad one's error, with its position
        when there are several."""
        specs: list[_Checked] = []
        seen: set[str] = set()
        for position, request in enumerate(requests):
            try:
                k = keys.SessionKeys(request.sid)
                spec = UpstreamSpec(url=request.url, headers=dict(request.headers))
                check_host(self._allow, spec.host)
            except InvalidInput as exc:
                if len(requests) == 1:
                    raise
                raise type(exc)(f"sessions[{position}] ({request.sid!r}): {exc}") from None
            if request.sid in seen:
                raise InvalidSessionId(
                    f"sessions[{position}]: session {request.sid!r} is named twice"
                )
            seen.add(request.sid)
            specs.append((k, spec))
        return specs

    async def _claim_batch(self, specs: Sequence[_Checked]) -> list[ClaimResult]:
        tokens = [secrets.token_hex(8) for _ in specs]
        # The lease index entries first: if a claim then takes a lease and this process dies
        # before its job is enqueued, the reconciler still finds the lease when it lapses.
        await index.track(
            self._redis,
            self._scripts,
            {k.sid: self._pending_ttl_ms for k, _ in specs},
            listing=index.Listing.TOUCH,
        )
        replies = await call_many(
            self._redis,
            self._scripts.claim,
            [
                (
                    [k.spec, k.lease, k.cancel, k.state],
                    ["put", token, self._pending_ttl_ms, spec.url, spec.headers_json()],
                )
                for (k, spec), token in zip(specs, tokens, strict=True)
            ],
        )
        results: list[ClaimResult] = []
        jobs: list[tuple[str, str, int]] = []
        held: dict[str, int | None] = {}
        updated: list[str] = []
        for (k, _), token, (outcome, epoch, due_ms) in zip(specs, tokens, replies, strict=True):
            result = ClaimResult(ClaimOutcome(reply_text(outcome)), int(epoch))
            results.append(result)
            if result.outcome in (ClaimOutcome.CREATED, ClaimOutcome.CLAIMED):
                jobs.append((k.sid, token, result.epoch))
                continue
            # A lease held by a reader: its deadline, not the pending claim's, is when the
            # reconciler must look (the reader's renewals keep moving it).
            held[k.sid] = int(due_ms)
            if result.outcome is ClaimOutcome.UPDATED:
                updated.append(k.sid)
        await self.enqueue_many(jobs)
        if held:
            await index.track(self._redis, self._scripts, held)
        for sid in updated:
            await self._redis.spublish(keys.CONTROL_CHANNEL, control_message("reconnect", sid))
        return results

    async def reclaim(self, sid: str) -> int | None:
        """Claim a desired session whose lease lapsed (the reconciler's path).

        Returns the new epoch when this call took the lease and enqueued a job, else None.
        """
        return (await self.reclaim_many([sid])).get(sid)

    async def reclaim_many(
        self, sids: Sequence[str], seen: Mapping[str, index.DueEntry] | None = None
    ) -> dict[str, int]:
        """:meth:`reclaim` for many sessions: pipelined claims, then one batch of jobs, then
        the sessions' lease index entries: the new deadline of each session still held or
        claimed, and (for the reconciler, which passes the ``seen`` entries it read) the
        removal of entries of sessions no longer desired.

        Returns the sessions this call claimed, with their new epochs.
        """
        claimed, _ = await self.reclaim_keeping(sids, seen, keep=0)
        return claimed

    async def reclaim_keeping(
        self, sids: Sequence[str], seen: Mapping[str, index.DueEntry] | None, *, keep: int
    ) -> tuple[dict[str, int], list[tuple[str, str, int]]]:
        """:meth:`reclaim_many`, where the caller (a worker with room) keeps up to ``keep`` of
        the sessions claimed to adopt itself: their jobs ``(sid, token, epoch)`` are returned
        instead of enqueued, which saves the queue's round trips. A kept job the caller fails
        to adopt is lost like a job nobody took: its lease lapses and it is claimed again."""
        claimed: dict[str, int] = {}
        kept: list[tuple[str, str, int]] = []
        for start in range(0, len(sids), RECLAIM_BATCH):
            batch = [
                (keys.SessionKeys(sid), secrets.token_hex(8))
                for sid in sids[start : start + RECLAIM_BATCH]
            ]
            replies = await call_many(
                self._redis,
                self._scripts.claim,
                [
                    (
                        [k.spec, k.lease, k.cancel, k.state],
                        ["reconcile", token, self._pending_ttl_ms, "", ""],
                    )
                    for k, token in batch
                ],
            )
            jobs = []
            dues: dict[str, int | None] = {}
            stale: list[index.DueEntry] = []
            for (k, token), (outcome, epoch, due_ms) in zip(batch, replies, strict=True):
                text = reply_text(outcome)
                if text == "claimed":
                    claimed[k.sid] = int(epoch)
                    jobs.append((k.sid, token, int(epoch)))
                if text == "gone":
                    if seen is not None and k.sid in seen:
                        stale.append(seen[k.sid])
                else:
                    dues[k.sid] = int(due_ms)
            room = max(0, keep - len(kept))
            kept += jobs[:room]
            await self.enqueue_many(jobs[room:])
            await index.track(self._redis, self._scripts, dues)
            if stale:
                await index.untrack(self._redis, self._scripts, stale)
        return claimed, kept

    async def enqueue(self, sid: str, token: str, epoch: int) -> None:
        await self.enqueue_many([(sid, token, epoch)])

    async def enqueue_many(self, jobs: Sequence[tuple[str, str, int]]) -> None:
        """Put listen jobs ``(sid, token, epoch)`` on the rq queue in one round trip.

        A job outliving its unrenewed lease is useless, so it expires with the lease; the
        reconciler claims again if nobody took it.
        """
        if not jobs:
            return
        ttl = max(1, int(self._pending_ttl_ms / 1000))
        datas = [
            Queue.prepare_data(
                LISTEN_JOB,
                args=(sid, token, epoch),
                ttl=ttl,
                result_ttl=0,
                failure_ttl=60,
                job_id=f"lp-{epoch}-{token}",  # rq ids allow no dots; session ids may have them
            )
            for sid, token, epoch in jobs
        ]
        await asyncio.to_thread(self._queue.enqueue_many, datas)

    async def cancel(self, sid: str) -> bool:
        """Stop listening to ``sid`` fleet-wide. Returns False for an unknown session.

        The tombstone outlives any reader: one that misses the pub/sub notice sees it on its next
        renewal (within ttl/3), and one cut off from Redis self-fences before its lease expires.
        """
        k = keys.SessionKeys(sid)
        tombstone_ms = int((2 * self._settings.lease_ttl + 5) * 1000)
        found = await self._scripts.cancel(
            keys=[k.spec, k.cancel, k.lease, k.state], args=[tombstone_ms]
        )
        if int(found) == 0:
            return False
        if int(found) == 1:
            await self._redis.spublish(keys.CONTROL_CHANNEL, control_message("cancel", sid))
        # The listing shows the change; the lease index entry is left to the reconciler.
        await index.track(self._redis, self._scripts, {sid: None}, listing=index.Listing.TOUCH)
        return True

    async def status(self, sid: str) -> SessionStatus | None:
        """The session's spec and state, or None when the session is unknown."""
        k = keys.SessionKeys(sid)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.spec)
            pipe.hgetall(k.state)
            pipe.get(k.lease)
            spec_raw, state_raw, lease = await pipe.execute()
        if not spec_raw:
            return None
        spec = {reply_text(a): reply_text(b) for a, b in spec_raw.items()}
        state = {reply_text(a): reply_text(b) for a, b in state_raw.items()}
        return SessionStatus(
            sid=sid,
            url=spec.get("url", ""),
            desired=spec.get("desired") == "1",
            state=state.get("state", "pending"),
            owner=state.get("owner", ""),
            epoch=int(spec.get("epoch", 0)),
            seq=int(state.get("seq", 0)),
            retries=int(state.get("retries", 0)),
            last_error=state.get("last_error", ""),
            last_id=state.get("last_id", ""),
            lease_holder=_lease_holder(lease),
            since_ms=int(state.get("since", 0)),
        )


def _lease_holder(lease: bytes | str | None) -> str:
    """The worker id in a lease value; empty while the lease waits for a worker to adopt it."""
    if not lease:
        return ""
    holder = reply_text(lease).split(":", 1)[0]
    return "" if holder == UNASSIGNED else holder
