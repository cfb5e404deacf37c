"""workers.reconciler.next_due_in on fakeredis, and the worker's collector settings."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from listenerpool import keys
from workers.collector import THRESHOLDS, tune_collector
from workers.reconciler import next_due_in


async def redis_now_ms(redis: Any) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_next_due_in_is_none_without_leases(fake_redis: Any) -> None:
    assert await next_due_in(fake_redis) is None


async def test_next_due_in_is_the_earliest_deadline(fake_redis: Any) -> None:
    now = await redis_now_ms(fake_redis)
    await fake_redis.zadd(keys.LEASE_DEADLINES, {"late": now + 9000, "early": now + 3000})
    due = await next_due_in(fake_redis)
    assert due is not None
    assert 2.5 < due <= 3.0


async def test_next_due_in_is_zero_once_a_lease_lapsed(fake_redis: Any) -> None:
    now = await redis_now_ms(fake_redis)
    await fake_redis.zadd(keys.LEASE_DEADLINES, {"gone": now - 5000, "held": now + 9000})
    assert await next_due_in(fake_redis) == 0.0


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
