"""On a Redis Cluster, rq's client follows its hash slot within one call.

rq needs a plain client, so on a cluster its connections go to whichever primary owns rq's
slot (``SlotOwnerConnection``): a MOVED reply drops the connection and marks the slot map
stale, and the client's retry reconnects. The retry reconnects through
``send_packed_command``, not the pool's ``connect()``: resolving the owner only in ``connect()``
sent every retry back to the old owner, and the first enqueue after a failover or a slot
migration failed (the reconciler's claims then waited 3 lease ttls for their jobs).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import rq.defaults
from redis.crc import key_slot

from listenerpool.connections import async_redis, listen_queue, sync_redis
from listenerpool.control import SessionControl
from listenerpool.testing.harness.redis_cluster import RedisClusterNodes
from tests.conftest import fast_settings


@pytest.fixture
def cluster() -> Iterator[RedisClusterNodes]:
    """A private cluster: the test moves rq's slot and fails its primary over."""
    with RedisClusterNodes(node_timeout_ms=1000) as nodes:
        yield nodes


async def test_the_first_enqueue_after_rqs_slot_moved_or_failed_over_succeeds(
    cluster: RedisClusterNodes,
) -> None:
    settings = fast_settings(redis_url=cluster.url)
    sync = sync_redis(settings)
    redis = async_redis(settings)
    queue = listen_queue(sync, settings)
    control = SessionControl(redis, queue, settings)
    slot = key_slot(rq.defaults.RQ_KEY_PREFIX.encode())
    try:
        await control.enqueue_many([("s", "t0", 1)])  # a pooled connection to the owner
        owner = cluster.owner(slot)
        target = next(port for port in cluster.primary_ports() if port != owner)
        cluster.move_slot(slot, target)
        await control.enqueue_many([("s", "t1", 2)])
        assert queue.count == 2

        cluster.failover(target)
        await control.enqueue_many([("s", "t2", 3)])
        assert queue.count == 3
    finally:
        sync.close()
        await redis.aclose()
