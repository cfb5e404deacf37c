"""An adopted session's lease index entry comes due when the adopted lease lapses.

A claim writes the entry for the unadopted lease, which lasts PENDING_TTL_FACTOR TTLs; the
adoption cuts the lease to one TTL. The reconciler only looks at a session when its entry
comes due, so if the entry kept the claim's deadline until the worker's first renewal round, a
worker dying in between would leave its sessions unclaimed for several TTLs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from listenerpool import keys
from listenerpool.control import PENDING_TTL_FACTOR
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker

TTL = 30.0  # renewal rounds TTL/3 = 10 s apart: the checks below come before the second one
SID = "adopted"


async def due_and_lease_left(pool: Pool) -> tuple[float, float]:
    """Seconds until the session's lease index entry is due, and its lease's remaining time,
    both by the server's clock."""
    k = keys.SessionKeys(SID)
    async with pool.redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.zscore(k.lease_index, SID)
        pipe.pttl(k.lease)
        (seconds, micros), score, pttl = await pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return (score - now_ms) / 1000, pttl / 1000


async def last_heartbeat(pool: Pool, worker_id: str) -> bytes | None:
    value: bytes | None = await pool.redis.hget(keys.worker_key(worker_id), "heartbeat")
    return value


def indexes_marked_intact(pool: Pool) -> Callable[[], Awaitable[bool]]:
    async def marked() -> bool:
        markers = await pool.redis.mget([keys.index_intact(b) for b in range(keys.INDEX_BUCKETS)])
        return all(marker == b"intact" for marker in markers)

    return marked


async def test_adoption_moves_the_lease_index_entry_to_the_adopted_leases_deadline(
    redis_server: RedisServer, upstream: SSEUpstream
) -> None:
    pool = Pool(redis_server.url, lease_ttl=TTL)
    try:
        async with running_worker(pool, "w-adopt", lease_ttl=TTL) as worker:
            await eventually(lambda: last_heartbeat(pool, "w-adopt"), 5, "no first round")
            # A fresh Redis has no index markers: the worker's first reconcile round rebuilds
            # the buckets, and a session claimed meanwhile is re-tracked as due at once (a
            # harmless extra look for a reconciler, but not the adoption's deadline).
            await eventually(indexes_marked_intact(pool), 10, "the index was not rebuilt")
            round_before = await last_heartbeat(pool, "w-adopt")

            await pool.control.claim(SID, upstream.url(SID))

            def listening() -> bool:
                reader = worker.reader(SID)
                return reader is not None and reader.connected.is_set()

            await eventually(listening, 10, "the session was not adopted")
            due_in, lease_left = await due_and_lease_left(pool)
            # Only the adoption can have moved the entry: no renewal round ran meanwhile.
            assert await last_heartbeat(pool, "w-adopt") == round_before
            assert due_in <= TTL, (
                f"index entry due in {due_in:.1f}s, the lease lapses in {lease_left:.1f}s "
                f"(the claim's deadline is {PENDING_TTL_FACTOR * TTL:g}s)"
            )
            # Never before the lease lapses: a reconciler would find it still held.
            assert due_in >= lease_left - 0.005
    finally:
        await pool.aclose()
