"""workers.reconciler.next_due_in on fakeredis (over every index bucket), and the worker's
collector settings."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from listenerpool import keys
from listenerpool.collector import THRESHOLDS, tune_collector
from listenerpool.connections import listen_queue
from listenerpool.control import SessionControl
from tests.conftest import fast_settings
from workers.reconciler import next_due_in, reconcile_once


async def redis_now_ms(redis: Any) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.fixture
def control(fake_redis: Any, fake_sync_redis: Any) -> SessionControl:
    settings = fast_settings()
    return SessionControl(fake_redis, listen_queue(fake_sync_redis, settings), settings)


async def deadlines(redis: Any, entries: dict[str, int]) -> None:
    """Lease deadlines, each in its session's index bucket."""
    for sid, score in entries.items():
        await redis.zadd(keys.lease_index(keys.index_bucket(sid)), {sid: score})


async def test_next_due_in_is_none_without_leases(fake_redis: Any, control: SessionControl) -> None:
    await reconcile_once(fake_redis, control)  # marks the (empty) buckets intact
    assert await next_due_in(fake_redis, control) is None


async def test_next_due_in_is_zero_while_a_bucket_is_lost(
    fake_redis: Any, control: SessionControl
) -> None:
    await reconcile_once(fake_redis, control)
    await fake_redis.delete(keys.index_intact(3))
    assert await next_due_in(fake_redis, control) == 0.0


async def test_next_due_in_is_the_earliest_deadline_of_all_buckets(
    fake_redis: Any, control: SessionControl
) -> None:
    await reconcile_once(fake_redis, control)  # marks the (empty) buckets intact
    now = await redis_now_ms(fake_redis)
    sids = [f"s{i}" for i in range(40)]
    assert len({keys.index_bucket(sid) for sid in sids}) > 4
    await deadlines(fake_redis, {sid: now + 90_000 for sid in sids} | {"early": now + 30_000})
    due = await next_due_in(fake_redis, control)
    # Not later than the earliest deadline, and not yet due: the time this test itself takes
    # only brings it closer, so the bounds hold on any machine short of a 30 s stall.
    assert due is not None
    assert 0 < due <= 30.0


async def test_next_due_in_is_zero_once_a_lease_lapsed(
    fake_redis: Any, control: SessionControl
) -> None:
    now = await redis_now_ms(fake_redis)
    await deadlines(fake_redis, {"gone": now - 5000, "held": now + 9000})
    assert await next_due_in(fake_redis, control) == 0.0


@pytest.fixture
def collector_restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector_restored")
def test_tune_collector_freezes_start_up_objects_and_raises_thresholds() -> None:
    gc.unfreeze()
    tune_collector()
    assert gc.get_threshold() == THRESHOLDS
    assert gc.get_freeze_count() > 0
