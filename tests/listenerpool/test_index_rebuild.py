"""A lost index bucket is rebuilt from the specs on every primary, on one Redis and on a
Redis Cluster (whose client scans each primary in turn)."""

from __future__ import annotations

from redis.crc import key_slot

from listenerpool import index, keys
from tests.conftest import BACKENDS, Pool
from tests.listenerpool.test_index import lose_bucket
from workers.reconciler import reconcile_once

BUCKET = 5


@BACKENDS
async def test_a_lost_bucket_is_rebuilt_from_the_specs_wherever_they_live(pool: Pool) -> None:
    sids = [sid for sid in (f"r{i}" for i in range(400)) if keys.index_bucket(sid) == BUCKET]
    sids = sids[:12]
    # On a cluster's even split these keys land on all three primaries.
    assert {key_slot(f"{{{sid}}}".encode()) * 3 // 16384 for sid in sids} == {0, 1, 2}
    for sid in sids:
        await pool.control.claim(sid, f"http://upstream.invalid/{sid}")
    assert await reconcile_once(pool.redis, pool.control) == 0  # buckets marked intact
    for job in pool.queue.jobs:
        job.delete()

    # The bucket's shard comes back empty; meanwhile every claim's lease lapsed unadopted.
    await lose_bucket(pool.redis, BUCKET)
    for sid in sids:
        await pool.redis.delete(keys.SessionKeys(sid).lease)

    assert await reconcile_once(pool.redis, pool.control) == len(sids)
    assert sorted(job.args[0] for job in pool.queue.jobs) == sorted(sids)
    assert set(sids) <= await pool.indexed("sessions")
    assert await pool.redis.get(keys.index_intact(BUCKET)) == b"intact"


async def test_an_empty_redis_given_its_markers_has_no_lost_bucket_to_rebuild(pool: Pool) -> None:
    """What single-node mode writes into the Redis it has just started: a claim made before
    any reconcile round is then not taken for a lost bucket's session."""
    assert (await index.due(pool.redis, pool.control.scripts, limit=0)).lost == list(
        range(keys.INDEX_BUCKETS)
    )
    await pool.redis.mset(index.markers_of_an_empty_redis())
    await pool.control.claim("early", "http://upstream.invalid/early")
    view = await index.due(pool.redis, pool.control.scripts, limit=10)
    assert view.lost == [] and view.entries == []
    assert await reconcile_once(pool.redis, pool.control) == 0
