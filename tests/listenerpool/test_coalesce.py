"""listenerpool.coalesce.Coalescer, and SessionControl.claim sharing round trips through it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from listenerpool import keys
from listenerpool.coalesce import Coalescer
from listenerpool.connections import listen_queue
from listenerpool.control import ClaimOutcome, SessionControl
from tests.conftest import BACKENDS, Pool, fast_settings

pytestmark = pytest.mark.timeout(30)


class Batches:
    """A ``run`` that records its batches and, while ``hold`` is clear, waits for it."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.started = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, items: list[str]) -> list[str]:
        self.seen.append(list(items))
        self.started.set()
        await self.hold.wait()
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        return [item.upper() for item in items]


def by_name(item: str) -> str:
    return item.split("#")[0]


def coalescer_of(run: Batches, limit: int = 100) -> Coalescer[str, str]:
    return Coalescer(run, key=by_name, limit=limit)


async def submitted(coalescer: Coalescer[str, str], *items: str) -> list[Any]:
    """Submit each item from a task of its own; returns once every one of them is queued."""
    queued = [asyncio.Event() for _ in items]

    async def submit(item: str, event: asyncio.Event) -> str:
        # submit() queues its item before it first waits, so in this very step.
        event.set()
        return await coalescer.submit(item)

    tasks = [asyncio.ensure_future(submit(i, e)) for i, e in zip(items, queued, strict=True)]
    async with asyncio.timeout(5):
        for event in queued:
            await event.wait()
    return tasks


async def under_way(run: Batches, coalescer: Coalescer[str, str], *items: str) -> list[Any]:
    """Submit ``items`` with ``run`` held: they are the batch under way when this returns."""
    run.hold.clear()
    futures = await submitted(coalescer, *items)
    async with asyncio.timeout(5):
        await run.started.wait()
    return futures


async def test_items_submitted_while_a_batch_runs_go_together_in_the_next() -> None:
    run = Batches()
    coalescer = coalescer_of(run)
    [first] = await under_way(run, coalescer, "a")
    later = await submitted(coalescer, "b", "c", "d")
    run.hold.set()
    assert await first == "A"
    assert await asyncio.gather(*later) == ["B", "C", "D"]
    assert run.seen == [["a"], ["b", "c", "d"]]


async def test_callers_of_one_pass_share_the_first_batch() -> None:
    run = Batches()
    coalescer = coalescer_of(run)
    names = [f"s{i}" for i in range(20)]
    assert await asyncio.gather(*(coalescer.submit(n) for n in names)) == [n.upper() for n in names]
    assert run.seen == [names]


async def test_one_key_never_twice_in_a_batch_and_in_the_order_submitted() -> None:
    run = Batches()
    coalescer = coalescer_of(run)
    items = ["x#1", "y#1", "x#2", "x#3", "y#2"]
    assert await asyncio.gather(*(coalescer.submit(i) for i in items)) == [i.upper() for i in items]
    assert run.seen == [["x#1", "y#1"], ["x#2", "y#2"], ["x#3"]]


async def test_a_batch_holds_at_most_limit_items() -> None:
    run = Batches()
    coalescer = coalescer_of(run, limit=2)
    await asyncio.gather(*(coalescer.submit(n) for n in "abcde"))
    assert run.seen == [["a", "b"], ["c", "d"], ["e"]]


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="limit must be at least 1"):
        Coalescer(Batches(), key=by_name, limit=0)


async def test_an_error_is_every_item_of_its_batch_and_the_next_batch_still_runs() -> None:
    run = Batches()
    coalescer = coalescer_of(run)
    run.fail = ConnectionError("redis went away")
    failing = await under_way(run, coalescer, "a", "b")
    [after] = await submitted(coalescer, "c")
    run.hold.set()
    for future in failing:
        with pytest.raises(ConnectionError, match="redis went away"):
            await future
    assert await after == "C"


async def test_a_run_giving_the_wrong_number_of_results_fails_its_batch() -> None:
    async def short(items: list[str]) -> list[str]:
        return items[:-1]

    coalescer: Coalescer[str, str] = Coalescer(short, key=by_name, limit=100)
    results = await asyncio.gather(
        coalescer.submit("a"), coalescer.submit("b"), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) and "1 results for 2 items" in str(r) for r in results)


async def test_a_caller_cancelled_before_its_batch_is_left_out_of_it() -> None:
    run = Batches()
    coalescer = coalescer_of(run)
    [first] = await under_way(run, coalescer, "a")
    gone, kept = await submitted(coalescer, "b", "c")
    gone.cancel()
    run.hold.set()
    assert (await first, await kept) == ("A", "C")
    assert gone.cancelled()
    assert run.seen == [["a"], ["c"]]


async def test_a_caller_cancelled_during_its_batch_leaves_the_others_their_results() -> None:
    run = Batches()
    coalescer = coalescer_of(run)
    gone, kept = await under_way(run, coalescer, "a", "b")
    gone.cancel()
    run.hold.set()
    assert await kept == "B"
    assert gone.cancelled()
    assert run.seen == [["a", "b"]]


async def test_cancelling_the_batches_cancels_every_waiting_caller_and_ends_the_task() -> None:
    run = Batches()
    coalescer = coalescer_of(run)
    [running] = await under_way(run, coalescer, "a")
    [waiting] = await submitted(coalescer, "b")
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "coalesce"]
    task.cancel()
    for future in (running, waiting):
        with pytest.raises(asyncio.CancelledError):
            await future
    await asyncio.wait([task], timeout=5)
    assert task.done()
    # A later submit starts a new task and is served.
    run.hold.set()
    assert await coalescer.submit("c") == "C"
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "coalesce"]


async def test_batches_cancelled_before_they_begin_cancel_their_callers() -> None:
    run = Batches()
    coalescer = coalescer_of(run)
    # The submit makes the batches' task; this test resumes before that task's first step.
    [waiting] = await submitted(coalescer, "a")
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "coalesce"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)
    assert run.seen == []
    assert await coalescer.submit("b") == "B"


async def test_concurrent_claims_share_one_enqueue_and_a_session_claimed_twice_gets_both(
    fake_redis: Any, fake_sync_redis: Any
) -> None:
    settings = fast_settings()
    queue = listen_queue(fake_sync_redis, settings)
    enqueues: list[int] = []
    enqueue_many = queue.enqueue_many

    def counting(datas: Any, *args: Any, **kwargs: Any) -> Any:
        enqueues.append(len(datas))
        return enqueue_many(datas, *args, **kwargs)

    queue.enqueue_many = counting  # type: ignore[method-assign]
    control = SessionControl(fake_redis, queue, settings)
    sids = [f"co-{i}" for i in range(50)]
    results = await asyncio.gather(
        *(control.claim(sid, f"http://127.0.0.1:9/events/{sid}") for sid in [*sids, "co-0"])
    )
    assert [r.outcome for r in results[:50]] == [ClaimOutcome.CREATED] * 50
    # The second claim of co-0 ran after the first, in a batch of its own.
    assert results[50].outcome is not ClaimOutcome.CREATED
    assert results[50].epoch == results[0].epoch
    assert sum(enqueues) == 50 and len(enqueues) < 50, enqueues
    assert queue.count == 50


@BACKENDS
async def test_claims_made_at_once_over_many_buckets_and_shards_are_each_claimed_once(
    pool: Pool,
) -> None:
    """One batch of concurrent claims spans index buckets (and, on a cluster, every shard):
    each is claimed, indexed and queued exactly once."""
    sids = [f"many-{i}" for i in range(40)]
    assert len({keys.index_bucket(sid) for sid in sids}) > 8
    results = await asyncio.gather(
        *(pool.control.claim(sid, f"http://upstream.invalid/{sid}") for sid in sids)
    )
    assert [r.outcome for r in results] == [ClaimOutcome.CREATED] * len(sids)
    assert sorted(job.args[0] for job in pool.queue.jobs) == sorted(sids)
    assert set(sids) <= await pool.indexed("sessions")
    again = await asyncio.gather(
        *(pool.control.claim(sid, f"http://upstream.invalid/{sid}") for sid in sids)
    )
    assert [r.outcome for r in again] == [ClaimOutcome.UNCHANGED] * len(sids)
    assert len(pool.queue.jobs) == len(sids)
