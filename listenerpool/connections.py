"""Redis clients and the rq queue, built the same way by every process."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
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


# Commands in flight per process; more callers wait for a connection instead of failing.
MAX_REDIS_CONNECTIONS = 64


def async_redis(settings: Settings) -> Any:
    """The asyncio client for commands and scripts. Calls that must not hang on a partition
    wrap themselves in deadlines; the connect timeout bounds reconnects. A burst of callers
    (thousands of readers publishing, a ramp of claims) queues for the pool's connections."""
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url(settings),
        max_connections=MAX_REDIS_CONNECTIONS,
        timeout=None,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
        # A pooled connection left over from before a Redis restart fails once; retry it on a
        # fresh connection instead of failing the caller.
        retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 2),
        retry_on_error=[redis.exceptions.ConnectionError],
    )
    return aioredis.Redis.from_pool(pool)


def sync_redis(settings: Settings) -> redis.Redis:
    """The blocking client rq uses (its reads block up to a second on BLMOVE). A connection the
    server closed (a restart, or fakeredis after an unknown command) is retried on a new one."""
    return redis.Redis.from_url(
        redis_url(settings),
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.exceptions.ConnectionError],
        socket_connect_timeout=5.0,
        socket_timeout=10.0,
        socket_keepalive=True,
    )


def listen_queue(connection: Any, settings: Settings) -> Queue:
    """The rq queue of listen jobs. JSON, not pickle: jobs carry only (sid, token, epoch)."""
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
