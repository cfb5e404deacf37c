"""On a Redis Cluster, a shard slow to answer holds up the lease renewals of its own sessions
only.

A renewal round sends every reader's renewal, grouped by the node serving its slot. When the
clocks were confirmed only once the whole round was over, one shard answering late (failing
over, restarting after losing its data) left every reader of the worker unconfirmed, and the
readers of the healthy shards fenced themselves on leases Redis had renewed (the cluster soak's
shard_lost fenced whole workers, and sessions whose shard had lost its data were lost with
their readers). And a round held up longer than a reader waits for it (a shard frozen, or
lost and brought back empty) must not hold up the next round: the clocks it confirmed at its
send time run out as it ends, and only a round sent meanwhile keeps the healthy shards' readers
going.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from listenerpool import keys
from listenerpool.testing.harness.redis_cluster import RedisClusterNodes
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker
from tests.gateway.test_cluster_e2e import sessions_on_every_primary

TTL = 6.0  # renewals every 2 s; a reader fences 4.8 s after its last confirmed renewal
INTERVAL = TTL / 3
FENCE_AFTER = TTL - TTL / 5
# Longer than a reader waits for a renewal (so that a round held up by the paused shard fences
# every reader it would have confirmed only at its end), shorter than the lease itself (so the
# paused shard's own leases are still there when it answers again).
PAUSE_WITHIN_A_ROUND = FENCE_AFTER + 0.6
# Longer than the round sent during the pause waits for its replies (it gives up, as a round
# sent during a shard's loss does): the healthy shards' clocks it confirmed at its send time
# run out as it ends, and only a round sent meanwhile can have confirmed them since.
PAUSE_BEYOND_A_ROUND = INTERVAL + FENCE_AFTER + 1.0


async def last_heartbeat(pool: Pool, worker_id: str) -> bytes | None:
    value: bytes | None = await pool.redis.hget(keys.worker_key(worker_id), "heartbeat")
    return value


@pytest.fixture
def cluster() -> Iterator[RedisClusterNodes]:
    """A private cluster whose primaries are not failed over while one is paused."""
    with RedisClusterNodes(node_timeout_ms=60_000) as nodes:
        yield nodes


@pytest.mark.parametrize(
    "pause",
    [
        pytest.param(PAUSE_WITHIN_A_ROUND, id="within-a-round"),
        pytest.param(PAUSE_BEYOND_A_ROUND, id="beyond-a-round"),
    ],
)
async def test_a_shard_slow_to_answer_holds_up_only_its_own_sessions_renewals(
    cluster: RedisClusterNodes, upstream: SSEUpstream, pause: float
) -> None:
    by_primary = sessions_on_every_primary(cluster, 2)
    slow = sorted(by_primary)[0]
    healthy = [sid for port, sids in by_primary.items() if port != slow for sid in sids]
    pool = Pool(cluster.url, lease_ttl=TTL)
    try:
        async with running_worker(pool, "w-shards", lease_ttl=TTL) as worker:
            for sids in by_primary.values():
                for sid in sids:
                    await pool.control.claim(sid, upstream.url(sid))

            def listening() -> bool:
                readers = [worker.reader(sid) for sids in by_primary.values() for sid in sids]
                return all(r is not None and r.connected.is_set() for r in readers)

            await eventually(listening, 20, "the sessions did not all start")
            before = {sid: worker.reader(sid) for sid in healthy}
            # Pause the shard just after a round ended (its last step is the heartbeat): the
            # next one is sent while the shard is paused and cannot end before the pause does.
            beat = await last_heartbeat(pool, "w-shards")
            deadline = time.monotonic() + 3 * INTERVAL
            while await last_heartbeat(pool, "w-shards") == beat:
                assert time.monotonic() < deadline, "no renewal round ended"
                await asyncio.sleep(0.005)
            cluster.servers[slow].pause()
            try:
                await asyncio.sleep(pause)  # the fault's length, not a wait for anything
            finally:
                cluster.servers[slow].resume()

            fenced = [sid for sid in healthy if worker.reader(sid) is not before[sid]]
            assert not fenced, f"readers of healthy shards fenced: {fenced}"
            assert worker.metrics.self_fences._value.get() == len(by_primary[slow]), (
                "only the paused shard's readers fence (their renewals came too late)"
            )
    finally:
        await pool.aclose()
