"""A reader's task is Reader.run itself: what ends it (a refused publish, a bug) ends that
reader alone, with its session handed back or left to its owner, and the worker goes on."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0  # a loaded machine's bound for one step, not a speed to meet


async def test_a_reader_that_crashes_hands_its_session_back_and_the_worker_goes_on(
    pool: Pool, upstream: SSEUpstream
) -> None:
    async with running_worker(pool) as worker:
        real = worker._publisher.call

        async def broken_for_one(keys: Sequence[str], args: Sequence[str | int]) -> int:
            if "lp:{crash}:lease" in keys:
                raise RuntimeError("a bug in the publish path")
            return await real(keys, args)

        worker._publisher.call = broken_for_one  # type: ignore[method-assign]
        await pool.control.claim("crash", upstream.url("crash"))
        await pool.control.claim("fine", upstream.url("fine"))

        async def handed_back() -> bool:
            state = (await pool.states(["crash"]))["crash"]
            return state.get("last_error") == "reader crashed"

        await eventually(handed_back, DEADLINE, "the crashed reader did not hand its session back")
        # The worker's task group saw no failure: the worker still serves and renews.
        await eventually(worker.healthy, DEADLINE, "the worker stopped serving")
        before = len(await pool.stream("fine"))

        async def flowing() -> bool:
            return len(await pool.stream("fine")) >= before + 5

        await eventually(flowing, DEADLINE, "the other reader stopped with the crashed one")
        assert "fine" in worker.held_sessions()
