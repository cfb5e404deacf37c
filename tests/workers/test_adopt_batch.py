"""A worker adopts the listen jobs it took together in one pipelined round trip (one per node
on a cluster), not one round trip per job: a ramp or a failover hands it hundreds at once."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection

from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker
from workers.dispatch import TAKE_BATCH

SESSIONS = 2 * TAKE_BATCH


class AdoptSends:
    """Counts the packets this process's asyncio Redis connections send that carry adopt.lua
    calls, and the calls in them."""

    def __init__(self, sha: str) -> None:
        self.sha = sha.encode()
        self.packets = 0
        self.calls = 0

    def wrap(self, send: Any) -> Any:
        async def counted(connection: Connection, command: Any, *args: Any, **kwargs: Any) -> Any:
            parts = [command] if isinstance(command, bytes | bytearray | memoryview) else command
            calls = sum(bytes(part).count(self.sha) for part in parts)
            if calls:
                self.packets += 1
                self.calls += calls
            return await send(connection, command, *args, **kwargs)

        return counted


async def test_queued_jobs_are_adopted_in_a_round_trip_per_batch_taken(
    redis_server: RedisServer, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = Pool(redis_server.url)
    try:
        sids = [f"batch-{n}" for n in range(SESSIONS)]
        for sid in sids:  # queued before any worker runs: the worker finds them all waiting
            await pool.control.claim(sid, upstream.url(sid))
        sends = AdoptSends(pool.control.scripts.adopt.sha)
        monkeypatch.setattr(
            Connection, "send_packed_command", sends.wrap(Connection.send_packed_command)
        )
        async with running_worker(pool, "w-batch", worker_capacity=SESSIONS) as worker:

            def all_listening() -> bool:
                readers = [worker.reader(sid) for sid in sids]
                return all(r is not None and r.connected.is_set() for r in readers)

            await eventually(all_listening, 30, "the sessions did not all start")
        assert sends.calls == SESSIONS, "one adopt per job"
        # TAKE_BATCH jobs per take: two takes, two round trips (NOSCRIPT adds none here: the
        # worker loads its scripts at start).
        assert sends.packets <= SESSIONS // TAKE_BATCH, (
            f"{sends.packets} packets for {SESSIONS} adopts"
        )
    finally:
        await pool.aclose()
