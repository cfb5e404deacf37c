"""workers.dispatch.take_job, take_queued and the job feed on fakeredis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from rq import Queue
from rq.job import Job

from listenerpool.connections import listen_queue
from listenerpool.control import LISTEN_JOB, SessionControl
from tests.conftest import fast_settings
from workers.dispatch import (
    JobFeed,
    ListenJob,
    sweep_intermediate,
    take_job,
    take_jobs,
    take_queued,
)

SETTINGS = fast_settings()


@pytest.fixture(params=["redis-7", "redis-5"])
def queue(request: pytest.FixtureRequest, fake_sync_redis: Any) -> Queue:
    """The listen queue in both of rq's dequeue modes.

    fakeredis has no INFO command, so rq takes it for Redis 5 and dequeues with BLPOP. Real
    Redis >= 6.2 makes rq BLMOVE each job into an intermediate list first; seeding rq's cached
    server version selects that path, which is the one production runs.
    """
    if request.param == "redis-7":
        setattr(fake_sync_redis, "__rq_redis_server_version", (7, 2, 0))
    return listen_queue(fake_sync_redis, SETTINGS)


@pytest.fixture
def control(fake_redis: Any, queue: Queue) -> SessionControl:
    return SessionControl(fake_redis, queue, SETTINGS)


def leftovers(queue: Queue, job_id: str) -> dict[str, int]:
    redis = queue.connection
    return {
        "queued": redis.llen(queue.key),
        "intermediate": redis.llen(queue.intermediate_queue_key),
        "job hash": redis.exists(f"rq:job:{job_id}"),
    }


async def test_take_job_returns_the_job_and_removes_every_trace(
    control: SessionControl, queue: Queue
) -> None:
    await control.enqueue("s1", "a1b2c3d4e5f6", 3)
    [job_id] = queue.job_ids
    assert queue.fetch_job(job_id).func_name == LISTEN_JOB  # type: ignore[union-attr]

    assert take_job(queue) == ListenJob(sid="s1", token="a1b2c3d4e5f6", epoch=3)
    assert leftovers(queue, job_id) == {"queued": 0, "intermediate": 0, "job hash": 0}


async def test_take_job_takes_jobs_in_order(control: SessionControl, queue: Queue) -> None:
    await control.enqueue("s1", "tok1", 1)
    await control.enqueue("s2", "tok2", 5)
    assert take_job(queue) == ListenJob("s1", "tok1", 1)
    assert take_job(queue) == ListenJob("s2", "tok2", 5)
    assert queue.count == 0


def test_take_job_on_an_empty_queue_returns_none(queue: Queue) -> None:
    assert take_job(queue) is None


@pytest.mark.parametrize("args", [("s1", "tok"), ("s1", "tok", 1, "extra"), ("s1", "tok", "x")])
def test_malformed_job_is_dropped(queue: Queue, args: tuple[Any, ...]) -> None:
    job = queue.enqueue_call(LISTEN_JOB, args=args, job_id="bad")
    queue.enqueue_call(LISTEN_JOB, args=("s2", "tok", 2), job_id="good")

    assert take_job(queue) is None
    assert leftovers(queue, job.id) == {"queued": 1, "intermediate": 0, "job hash": 0}
    assert take_job(queue) == ListenJob("s2", "tok", 2)  # the next job is unaffected


@pytest.mark.parametrize("queue", ["redis-7"], indirect=True)  # no intermediate list on BLPOP
async def test_expired_job_leaves_nothing_behind(control: SessionControl, queue: Queue) -> None:
    await control.enqueue("s1", "tok1", 1)
    [job_id] = queue.job_ids
    queue.connection.delete(Job.key_for(job_id))  # what the job's ttl does when no worker is free

    assert take_job(queue) is None
    assert leftovers(queue, job_id) == {"queued": 0, "intermediate": 1, "job hash": 0}
    assert sweep_intermediate(queue) == 1  # the feed runs this every minute
    assert leftovers(queue, job_id) == {"queued": 0, "intermediate": 0, "job hash": 0}


async def test_take_queued_takes_up_to_limit_in_order_and_leaves_no_trace(
    control: SessionControl, queue: Queue
) -> None:
    await control.enqueue_many([(f"s{i}", f"tok{i}", i) for i in range(5)])
    ids = queue.job_ids

    assert take_queued(queue, 3) == [ListenJob(f"s{i}", f"tok{i}", i) for i in range(3)]
    for job_id in ids[:3]:
        assert leftovers(queue, job_id) == {"queued": 2, "intermediate": 0, "job hash": 0}
    assert take_queued(queue, 10) == [ListenJob("s3", "tok3", 3), ListenJob("s4", "tok4", 4)]
    assert leftovers(queue, ids[4]) == {"queued": 0, "intermediate": 0, "job hash": 0}
    assert take_queued(queue, 10) == []


async def test_take_jobs_blocks_for_the_first_then_batches_the_rest(
    control: SessionControl, queue: Queue
) -> None:
    await control.enqueue_many([(f"s{i}", f"tok{i}", 1) for i in range(4)])
    assert [job.sid for job in take_jobs(queue, 3)] == ["s0", "s1", "s2"]
    assert [job.sid for job in take_jobs(queue, 3)] == ["s3"]
    assert queue.count == 0


def test_take_queued_drops_malformed_and_expired_jobs(queue: Queue) -> None:
    bad = queue.enqueue_call(LISTEN_JOB, args=("s1", "tok"), job_id="bad")
    gone = queue.enqueue_call(LISTEN_JOB, args=("s2", "tok", 2), job_id="gone")
    queue.enqueue_call(LISTEN_JOB, args=("s3", "tok", 3), job_id="good")
    queue.connection.delete(gone.key)  # expired while queued

    assert take_queued(queue, 10) == [ListenJob("s3", "tok", 3)]
    for job_id in (bad.id, gone.id, "good"):
        assert leftovers(queue, job_id) == {"queued": 0, "intermediate": 0, "job hash": 0}


async def test_jobs_read_beyond_the_room_left_when_the_read_returns_go_back(
    control: SessionControl, queue: Queue
) -> None:
    # The room is 3 when the feed asks and 1 once the jobs are read (the worker's reconciler
    # adopted two meanwhile): one job is handled, the other two go back.
    await control.enqueue_many([(f"s{i}", f"tok{i}", 1) for i in range(3)])
    rooms = iter([3, 1])
    handled: list[ListenJob] = []
    back: list[ListenJob] = []
    feed: JobFeed

    async def handle(jobs: list[ListenJob]) -> None:
        handled.extend(jobs)
        feed.stop()

    async def put_back(job: ListenJob) -> None:
        back.append(job)

    feed = JobFeed(queue, handle, lambda: next(rooms, 0))
    await asyncio.wait_for(feed.run(put_back), 10)
    assert [job.sid for job in handled] == ["s0"]
    assert [job.sid for job in back] == ["s1", "s2"]
