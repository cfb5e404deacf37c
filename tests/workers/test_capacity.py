"""A worker holds at most ``LP_WORKER_CAPACITY`` readers; further jobs wait in the queue."""

from __future__ import annotations

import pytest

from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker

pytestmark = pytest.mark.timeout(60)


async def test_a_full_worker_leaves_jobs_queued_until_a_reader_stops(
    pool: Pool, upstream: SSEUpstream
) -> None:
    async with running_worker(pool, worker_capacity=2) as worker:
        sids = ["cap1", "cap2", "cap3"]
        for sid in sids:
            await pool.control.claim(sid, upstream.url(sid))
        await eventually(lambda: len(worker.held_sessions()) == 2, 10, "readers not started")
        [waiting] = [sid for sid in sids if sid not in worker.held_sessions()]
        # The third job stays queued: no reader, no connection, state still pending.
        assert pool.queue.count == 1
        assert worker.load == 2
        assert (await pool.states([waiting]))[waiting].get("state", "pending") == "pending"
        assert upstream.stats(waiting).connections_total == 0
        # A place frees up: the waiting session is taken at once.
        await pool.control.cancel(worker.held_sessions()[0])
        await eventually(lambda: waiting in worker.held_sessions(), 10, "queued job not taken")
        await eventually(lambda: upstream.stats(waiting).connections_total == 1, 10, "no reader")
        assert worker.load == 2
