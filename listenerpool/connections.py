"""Redis clients and the rq queue, built the same way by every process."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from rq import Queue
from rq.serializers import JSONSerializer

from listenerpool.errors import ListenerPoolError
from listenerpool.settings import Settings


class RedisNotConfigured(ListenerPoolError):
    """A process that needs a shared Redis was started without ``LP_REDIS_URL``."""


def redis_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise RedisNotConfigured("LP_REDIS_URL is not set: give the Redis URL of the pool")
    return settings.redis_url


def async_redis(settings: Settings) -> Any:
    """The asyncio client for commands and scripts. Calls that must not hang on a partition
    wrap themselves in deadlines; the connect timeout bounds reconnects."""
    return aioredis.Redis.from_url(
        redis_url(settings),
        socket_connect_timeout=min(5.0, settings.lease_ttl / 3),
        socket_keepalive=True,
        health_check_interval=30,
    )


def sync_redis(settings: Settings) -> redis.Redis:
    """The blocking client rq uses (its reads block up to a second on BLMOVE)."""
    return redis.Redis.from_url(
        redis_url(settings),
        socket_connect_timeout=min(5.0, settings.lease_ttl / 3),
        socket_timeout=10.0,
        socket_keepalive=True,
    )


def listen_queue(connection: Any, settings: Settings) -> Queue:
    """The rq queue of listen jobs. JSON, not pickle: jobs carry only (sid, token, epoch)."""
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
