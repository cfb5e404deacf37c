"""A worker that adopts a session it still reads stops the old reader before the new one
connects.

Redis can let a session be claimed again while its reader runs: a failover to a replica that
had not received the adoption (its lease), or a node restarted from an older snapshot, leaves
the session desired with no lease, and a reconciler claims it at once. When the job lands on
the worker already reading the session, the old reader is no longer the owner, and the
upstream must not see it next to the new one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from listenerpool import keys
from listenerpool.connections import LEASE_CONNECTIONS, async_redis
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, fast_settings, running_worker
from workers.worker import Worker

TTL = 30.0  # renewal rounds 10 s apart: no renewal stops the old reader during the test
SID = "again"


def listening(worker: Worker) -> bool:
    reader = worker.reader(SID)
    return reader is not None and reader.connected.is_set()


async def test_a_session_adopted_again_by_its_own_worker_stops_the_old_reader_first(
    redis_server: RedisServer, upstream: SSEUpstream
) -> None:
    # One event every 20 s: the old reader publishes nothing (which Redis would refuse, and
    # stop it) while the test runs.
    upstream.configure(SID, rate=0.05)
    pool = Pool(redis_server.url, lease_ttl=TTL)
    try:
        async with running_worker(pool, "w-again", lease_ttl=TTL) as worker:
            await pool.control.claim(SID, upstream.url(SID))

            await eventually(lambda: listening(worker), 10, "the session was not adopted")
            first = worker.reader(SID)
            # What a failover that lost the adoption leaves: the spec, and no lease.
            await pool.redis.delete(keys.SessionKeys(SID).lease)
            claimed = await pool.control.reclaim_many([SID])
            assert SID in claimed

            def adopted_again() -> bool:
                reader = worker.reader(SID)
                return reader is not None and reader is not first and reader.connected.is_set()

            await eventually(adopted_again, 10, "the new claim was not adopted")
            connections = sorted(upstream.stats(SID).connections, key=lambda c: c.opened)
            assert len(connections) == 2, connections
            old, new = connections
            assert old.closed is not None and old.closed <= new.opened, (
                f"the old reader's connection was open until {old.closed} "
                f"while the new one opened at {new.opened}"
            )
            assert upstream.stats(SID).concurrent == 1
    finally:
        await pool.aclose()


class GatedLeases:
    """A worker's lease client whose pipelines (a renewal round's scripts, its heartbeat) wait
    at a gate while the test holds it closed: a renewal round sent, and not yet answered."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self.open = asyncio.Event()
        self.open.set()
        self.waiting = asyncio.Event()  # a pipeline waits at the closed gate
        self.executed = 0  # pipelines answered

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)

    def pipeline(self, **options: Any) -> GatedPipeline:
        return GatedPipeline(self._redis.pipeline(**options), self)


class GatedPipeline:
    def __init__(self, pipe: Any, gate: GatedLeases) -> None:
        self._pipe = pipe
        self._gate = gate

    async def __aenter__(self) -> GatedPipeline:
        await self._pipe.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pipe.__aexit__(*exc_info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    async def execute(self, **options: Any) -> Any:
        if not self._gate.open.is_set():
            self._gate.waiting.set()
            await self._gate.open.wait()
        replies = await self._pipe.execute(**options)
        self._gate.executed += 1
        return replies


async def test_a_renewal_answered_after_the_session_was_adopted_again_leaves_the_new_reader(
    redis_server: RedisServer, upstream: SSEUpstream
) -> None:
    # A round sent with the old reader's lease is answered "lost" (the lease is the new
    # reader's now). That verdict is about the old lease: the new reader, which has the same
    # session id, must go on.
    upstream.configure(SID, rate=0.05)  # as above: the old reader publishes nothing
    ttl = 15.0  # renewals every 5 s; a reader fences 12 s after its last confirmed renewal
    pool = Pool(redis_server.url, lease_ttl=ttl)
    leases = GatedLeases(async_redis(pool.settings, max_connections=LEASE_CONNECTIONS))
    worker = Worker(
        fast_settings(redis_url=pool.url, lease_ttl=ttl),
        redis=pool.redis,
        lease_redis=leases,
        queue=pool.queue,
        worker_id="w-verdict",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await eventually(worker.ready.is_set, 10, "worker did not start")
        await pool.control.claim(SID, upstream.url(SID))

        await eventually(lambda: listening(worker), 10, "the session was not adopted")
        first = worker.reader(SID)
        leases.open.clear()
        await asyncio.wait_for(leases.waiting.wait(), 3 * ttl)  # a round holds the old lease
        await pool.redis.delete(keys.SessionKeys(SID).lease)
        assert SID in await pool.control.reclaim_many([SID])

        def adopted_again() -> bool:
            reader = worker.reader(SID)
            return reader is not None and reader is not first and reader.connected.is_set()

        await eventually(adopted_again, 10, "the new claim was not adopted")
        second = worker.reader(SID)
        answered = leases.executed
        leases.open.set()
        # The held round ends (its scripts, its lease index entries, its heartbeat), and so
        # does the round after it, sent with the new reader.
        await eventually(lambda: leases.executed >= answered + 6, 3 * ttl, "no round ended")
        assert worker.reader(SID) is second, "the new reader was stopped by the old verdict"
        assert second is not None and second.connected.is_set()
        assert upstream.stats(SID).concurrent == 1
    finally:
        stop.set()
        done, _ = await asyncio.wait([task], timeout=15)
        if not done:
            task.cancel()
        await leases.aclose()
        await pool.aclose()
        assert done, "worker did not drain"
