"""The worker's reconcile loop: it keeps running when Redis never answers the question of when
the next lease lapses (a cluster node caught between losing its shard and being given it back),
and the sessions it re-claims it adopts itself while it has room, without the queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

import workers.worker
from listenerpool import index, keys
from listenerpool.control import SessionControl
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker
from workers.reconciler import reconcile_once

pytestmark = pytest.mark.timeout(60)


async def test_a_next_due_question_that_is_never_answered_does_not_stop_reconciling(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = asyncio.Event()
    rounds = 0

    async def never_answered(redis: Any, control: SessionControl) -> float | None:
        asked.set()
        await asyncio.Event().wait()  # a reply that never comes
        return None

    async def counted(redis: Any, control: SessionControl, **options: Any) -> int:
        nonlocal rounds
        rounds += 1
        return await reconcile_once(redis, control, **options)

    monkeypatch.setattr(workers.worker, "next_due_in", never_answered)
    monkeypatch.setattr(workers.worker, "reconcile_once", counted)
    async with running_worker(pool, reconcile_interval=0.5) as worker:
        await eventually(asked.is_set, 10, "the loop never asked when the next lease lapses")
        await eventually(
            lambda: rounds >= 2, 20, "reconcile rounds stopped behind an unanswered question"
        )
        assert worker.ready.is_set()


async def lapsed(pool: Pool, upstream: SSEUpstream, sids: list[str]) -> None:
    """Desired sessions whose leases lapsed with no job queued: what a dead worker leaves."""
    for sid in sids:
        await pool.control.claim(sid, upstream.url(sid))
    pool.queue.empty()
    await pool.redis.delete(*(keys.SessionKeys(sid).lease for sid in sids))
    await index.track(pool.redis, pool.control.scripts, dict.fromkeys(sids, 0))


def recording_enqueues(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    enqueued: list[str] = []
    enqueue_many = SessionControl.enqueue_many

    async def recorded(self: SessionControl, jobs: Any) -> None:
        enqueued.extend(sid for sid, _, _ in jobs)
        await enqueue_many(self, jobs)

    monkeypatch.setattr(SessionControl, "enqueue_many", recorded)
    return enqueued


async def test_sessions_a_worker_reclaims_it_adopts_itself_without_a_queued_job(
    pool: Pool, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    sids = [f"direct-{n}" for n in range(5)]
    await lapsed(pool, upstream, sids)
    enqueued = recording_enqueues(monkeypatch)
    async with running_worker(pool, "w-direct") as worker:

        def all_listening() -> bool:
            readers = [worker.reader(sid) for sid in sids]
            return all(r is not None and r.connected.is_set() for r in readers)

        await eventually(all_listening, 20, "the re-claimed sessions did not all start")
        epochs = {sid: r.session.epoch for sid in sids if (r := worker.reader(sid))}
        assert epochs == dict.fromkeys(sids, 2), "held under the reconciler's claim"
        assert enqueued == [], "a session the worker adopted itself went through the queue"


async def test_what_a_reclaiming_worker_has_no_room_for_goes_to_the_queue(
    pool: Pool, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    sids = [f"full-{n}" for n in range(3)]
    await lapsed(pool, upstream, sids)
    enqueued = recording_enqueues(monkeypatch)
    async with running_worker(pool, "w-full", worker_capacity=1) as worker:
        await eventually(lambda: worker.load == 1, 20, "the worker adopted none itself")
        # Its job feed may take a queued job before the reconciler's adoption fills the room:
        # it puts that one back.
        await eventually(lambda: pool.queue.count == 2, 20, "the two left over are not queued")
        held = worker.held_sessions()
        assert worker.load == 1, "a worker holds no more than its capacity"
        assert sorted(held + sorted(set(enqueued))) == sids, (held, enqueued)


async def test_the_room_a_reconcile_round_keeps_is_not_given_to_a_queued_job_meanwhile(
    pool: Pool, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round decides how many of its claims to keep before it claims them, enqueues the
    rest, then adopts the kept ones. The job feed must not take a job it just enqueued into
    that room in between, or the worker ends up holding more than its capacity."""
    sids = [f"room-{n}" for n in range(3)]
    await lapsed(pool, upstream, sids)
    enqueue_many = SessionControl.enqueue_many

    started: list[workers.worker.Worker] = []

    async def then_give_the_feed_time(self: SessionControl, jobs: Any) -> None:
        await enqueue_many(self, jobs)
        if not jobs or not started:
            return
        # Under load the feed's thread can read a job before the round goes on to adopt what
        # it kept; here the feed is given the time it needs (within the round's deadline)
        # to read one and then put it back for want of room, or start adopting it.
        worker = started[0]
        with contextlib.suppress(AssertionError):
            await eventually(lambda: pool.queue.count < len(jobs), 0.5)
            await eventually(lambda: pool.queue.count == len(jobs) or worker.load > 0, 0.5)

    monkeypatch.setattr(SessionControl, "enqueue_many", then_give_the_feed_time)
    async with running_worker(pool, "w-room", worker_capacity=1) as worker:
        started.append(worker)
        await eventually(lambda: worker.load == 1, 20, "the worker adopted none itself")
        await eventually(lambda: pool.queue.count == 2, 20, "the two left over are not queued")
        assert worker.load == 1, f"holds {worker.held_sessions()} with a capacity of 1"


async def test_a_batch_taken_over_is_logged_in_a_line_and_each_session_at_debug(
    pool: Pool, upstream: SSEUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker taking sessions over in batches logs one INFO line per batch re-claimed and
    per batch of readers started (an INFO line per session would cost it a tenth of its CPU);
    each session's own lines are there at DEBUG, and its 'listening' at INFO."""
    sids = [f"quiet-{n}" for n in range(12)]
    await lapsed(pool, upstream, sids)
    caplog.set_level(logging.DEBUG, logger="workers")
    async with running_worker(pool, "w-quiet") as worker:

        def all_listening() -> bool:
            readers = [worker.reader(sid) for sid in sids]
            return all(r is not None and r.connected.is_set() for r in readers)

        await eventually(all_listening, 20, "the re-claimed sessions did not all start")

    def lines(state: str, level: int) -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "state", None) == state
                and r.levelno == level]  # fmt: skip

    def named(records: list[logging.LogRecord]) -> list[str]:
        """The sessions lines about one session name ("session <sid>: ...")."""
        return sorted(r.getMessage().split(":")[0].removeprefix("session ") for r in records)

    for state in ("reclaimed", "connecting"):
        batches = lines(state, logging.INFO)
        assert batches, f"no INFO line for the batch ({state})"
        assert all(not r.getMessage().startswith("session ") for r in batches), "per session"
        assert sum(r.count for r in batches) == len(sids), [r.getMessage() for r in batches]
        assert named(lines(state, logging.DEBUG)) == sorted(sids)
    assert "quiet-0" in lines("reclaimed", logging.INFO)[0].getMessage()
    assert named(lines("listening", logging.INFO)) == sorted(sids)
