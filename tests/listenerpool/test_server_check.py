"""The start-up check of the Redis server: sharded pub/sub (Redis 7) or a clear refusal."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
import redis.exceptions

from listenerpool.connections import RedisTooOld, check_server
from listenerpool.settings import load_settings
from workers.worker import Worker


class OldRedis:
    """Answers SPUBLISH as Redis 6 does."""

    async def spublish(self, channel: str, message: str) -> int:
        raise redis.exceptions.ResponseError(
            f"unknown command 'SPUBLISH', with args beginning with: '{channel}' '{message}' "
        )


class Refusing:
    async def spublish(self, channel: str, message: str) -> int:
        raise redis.exceptions.ResponseError("NOPERM this user has no permissions")


async def test_a_server_with_sharded_pubsub_passes() -> None:
    await check_server(fakeredis.FakeAsyncRedis())


async def test_a_server_without_spublish_is_refused_by_name() -> None:
    with pytest.raises(RedisTooOld, match="Redis 7 or later"):
        await check_server(OldRedis())


async def test_other_errors_are_not_mistaken_for_an_old_server() -> None:
    with pytest.raises(redis.exceptions.ResponseError, match="NOPERM"):
        await check_server(Refusing())


async def test_a_redis_6_server_stops_the_worker_at_start() -> None:
    """The worker refuses to run on it (the CLI turns this into a message and exit status)."""
    client = fakeredis.FakeAsyncRedis()
    client.spublish = OldRedis().spublish  # type: ignore[method-assign]
    settings = load_settings(redis_url="redis://127.0.0.1:1/0")
    worker = Worker(settings, redis=client, queue=None, worker_id="w-old")
    with pytest.raises(RedisTooOld):
        await asyncio.wait_for(worker.run(asyncio.Event()), 5)
