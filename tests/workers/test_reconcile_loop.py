"""The worker's reconcile loop keeps running when Redis never answers the question of when the
next lease lapses (a cluster node caught between losing its shard and being given it back)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import workers.worker
from listenerpool.control import SessionControl
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

    async def counted(redis: Any, control: SessionControl) -> int:
        nonlocal rounds
        rounds += 1
        return await reconcile_once(redis, control)

    monkeypatch.setattr(workers.worker, "next_due_in", never_answered)
    monkeypatch.setattr(workers.worker, "reconcile_once", counted)
    async with running_worker(pool, reconcile_interval=0.5) as worker:
        await eventually(asked.is_set, 10, "the loop never asked when the next lease lapses")
        await eventually(
            lambda: rounds >= 2, 20, "reconcile rounds stopped behind an unanswered question"
        )
        assert worker.ready.is_set()
