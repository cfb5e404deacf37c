"""A worker that adopts a session it still reads stops the old reader before the new one
connects.

Redis can let a session be claimed again while its reader runs: a failover to a replica that
had not received the adoption (its lease), or a node restarted from an older snapshot, leaves
the session desired with no lease, and a reconciler claims it at once. When the job lands on
the worker already reading the session, the old reader is no longer the owner, and the
upstream must not see it next to the new one.
"""

from __future__ import annotations

from listenerpool import keys
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker

TTL = 30.0  # renewal rounds 10 s apart: no renewal stops the old reader during the test
SID = "again"


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

            def listening() -> bool:
                reader = worker.reader(SID)
                return reader is not None and reader.connected.is_set()

            await eventually(listening, 10, "the session was not adopted")
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
