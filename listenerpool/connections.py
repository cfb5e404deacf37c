"""Redis clients and the rq queue, built the same way by every process from ``LP_REDIS_URL``.

The URL says what Redis is (see :mod:`listenerpool.redis_url`): one server, a Redis Cluster, or
a primary watched by Sentinels. The rest of the pool does not ask: every Lua script touches one
session's keys (one hash slot), index keys are separate commands, and live events use sharded
pub/sub, so the same calls work on all three.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.exceptions
import rq.defaults
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode as SyncClusterNode
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel
from rq import Queue
from rq.serializers import JSONSerializer

from listenerpool import keys
from listenerpool.errors import ListenerPoolError
from listenerpool.redis_url import RedisKind, RedisTarget, parse_redis_url
from listenerpool.settings import Settings


class RedisTooOld(ListenerPoolError):
    """The Redis server lacks what the pool needs (sharded pub/sub: Redis 7 or later)."""


async def check_server(client: Any) -> None:
    """Refuse a server without sharded pub/sub at start, with a message that says so, instead
    of failing every publish later. Connection errors propagate (the caller may wait for Redis).
    A probe, not a version number: fakeredis has no INFO, and what matters is the command."""
    try:
        await client.spublish(keys.PROBE_CHANNEL, "")
    except redis.exceptions.ResponseError as exc:
        if "unknown command" not in str(exc).lower():
            raise
        raise RedisTooOld(
            "the Redis server at LP_REDIS_URL does not know SPUBLISH: the pool needs Redis 7 "
            "or later (live events use sharded pub/sub)"
        ) from None


class RedisNotConfigured(ListenerPoolError):
    """A process that needs a shared Redis was started without ``LP_REDIS_URL``."""


class RqKeysNotInOneSlot(ListenerPoolError):
    """On a Redis Cluster rq's keys must share a hash slot; its key prefix has no hash tag."""


def redis_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise RedisNotConfigured("LP_REDIS_URL is not set: give the Redis URL of the pool")
    return settings.redis_url


def redis_target(settings: Settings) -> RedisTarget:
    """The parsed ``LP_REDIS_URL`` (validated when the settings were built)."""
    return parse_redis_url(redis_url(settings))


# Commands in flight per process (per node on a cluster); more callers wait for a connection
# instead of failing.
MAX_REDIS_CONNECTIONS = 64
# A cluster client cannot make callers wait for a node's connection; it fails them. Its bound
# is therefore well above what a burst of readers publishing at once on one worker needs.
MAX_CLUSTER_NODE_CONNECTIONS = 1024
# A worker's lease client carries one renewal round (a pipeline per node) and the heartbeat at
# a time, plus the odd retry: a few connections per node are plenty.
LEASE_CONNECTIONS = 4
CONNECT_TIMEOUT = 5.0


def async_redis(settings: Settings, *, max_connections: int | None = None) -> Any:
    """The asyncio client for commands and scripts. Calls that must not hang on a partition
    wrap themselves in deadlines; the connect timeout bounds reconnects. A burst of callers
    (thousands of readers publishing, a ramp of claims) queues for the pool's connections.

    On a cluster this is a :class:`redis.asyncio.cluster.RedisCluster` (it follows MOVED/ASK
    redirections and failovers); with Sentinel a client whose connections ask the Sentinels
    for the current primary each time they (re)connect.

    ``max_connections`` lowers the bound of a single-server or Sentinel client, for a client
    with one narrow job (a worker's lease renewals). A cluster client keeps its bound: it
    fails the callers beyond it instead of making them wait, and a renewal round's retries
    go out concurrently."""
    target = redis_target(settings)
    # A pooled connection left over from before a Redis restart fails once; retry it on a
    # fresh connection instead of failing the caller.
    retry = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 2)
    common: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }
    if target.kind is RedisKind.CLUSTER:
        return AsyncRedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            ssl=target.ssl,
            max_connections=MAX_CLUSTER_NODE_CONNECTIONS,
            **common,
        )
    if target.kind is RedisKind.SENTINEL:
        sentinel = AsyncSentinel(
            target.nodes,
            sentinel_kwargs=_sentinel_kwargs(target),
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        return sentinel.master_for(
            target.master,
            connection_pool_class=BlockingSentinelConnectionPool,
            max_connections=max_connections or MAX_REDIS_CONNECTIONS,
            timeout=None,
            db=target.db,
            username=target.username,
            password=target.password,
            ssl=target.ssl,
            retry=retry,
            retry_on_error=[redis.exceptions.ConnectionError],
            **common,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        target.url,
        max_connections=max_connections or MAX_REDIS_CONNECTIONS,
        timeout=None,
        retry=retry,
        retry_on_error=[redis.exceptions.ConnectionError],
        **common,
    )
    return aioredis.Redis.from_pool(pool)


class BlockingSentinelConnectionPool(AsyncSentinelPool, aioredis.BlockingConnectionPool):
    """Sentinel's primary-following connections, with callers waiting for a free connection
    when all are busy (as on a single server) instead of failing."""


def sync_redis(settings: Settings) -> redis.Redis:
    """The blocking client rq uses (its reads block up to a second on BLMOVE). A connection the
    server closed (a restart, or fakeredis after an unknown command) is retried on a new one.

    rq needs a plain client (transactions, WATCH, server INFO), so on a cluster this is one
    whose connections go to the primary that owns rq's hash slot (see :class:`SlotOwner`):
    rq's keys all carry the ``{rq}`` hash tag."""
    target = redis_target(settings)
    common: dict[str, Any] = {
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        "retry_on_error": [redis.exceptions.ConnectionError],
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": 10.0,
        "socket_keepalive": True,
    }
    if target.kind is RedisKind.CLUSTER:
        _check_rq_prefix()
        owner = SlotOwner(target, rq.defaults.RQ_KEY_PREFIX)
        pool = redis.ConnectionPool(
            connection_class=SlotOwnerConnection,
            owner=owner,
            username=target.username,
            password=target.password,
            **common,
        )
        return redis.Redis(connection_pool=pool)
    if target.kind is RedisKind.SENTINEL:
        sentinel = Sentinel(
            target.nodes,
            sentinel_kwargs=_sentinel_kwargs(target),
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        client: redis.Redis = sentinel.master_for(
            target.master,
            db=target.db,
            username=target.username,
            password=target.password,
            ssl=target.ssl,
            **common,
        )
        return client
    return redis.Redis.from_url(target.url, **common)


def _sentinel_kwargs(target: RedisTarget) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT, "ssl": target.ssl}
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    return kwargs


def _check_rq_prefix() -> None:
    prefix = rq.defaults.RQ_KEY_PREFIX
    if not ("{" in prefix and "}" in prefix.split("{", 1)[1]):
        raise RqKeysNotInOneSlot(
            f"rq's key prefix is {prefix!r}: on a Redis Cluster it needs a hash tag. rq reads "
            "RQ_KEY_PREFIX when first imported; import listenerpool before rq, or set "
            "RQ_KEY_PREFIX={rq}"
        )


class SlotOwner:
    """Where the primary owning ``key``'s hash slot is, from a cluster's slot map. The map is
    read again after :meth:`stale` (a MOVED reply, a refused connection). Thread-safe: rq runs
    in executor threads."""

    def __init__(self, target: RedisTarget, key: str) -> None:
        self._cluster = RedisCluster(
            startup_nodes=[SyncClusterNode(host, port) for host, port in target.nodes],  # type: ignore[no-untyped-call]
            username=target.username,
            password=target.password,
            ssl=target.ssl,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        self._key = key
        self._lock = threading.Lock()
        self._stale = False

    def address(self) -> tuple[str, int]:
        with self._lock:
            if self._stale:
                self._cluster.nodes_manager.initialize()
                self._stale = False
            node = self._cluster.get_node_from_key(self._key)  # type: ignore[no-untyped-call]
            return node.host, int(node.port)

    def stale(self) -> None:
        self._stale = True


class SlotOwnerConnection(redis.Connection):
    """A connection to whichever primary owns one hash slot now: resolved on every connect,
    dropped (and the slot map marked stale) on MOVED or when the server refuses us, so the
    client's retry goes to the new owner after a failover or a slot migration."""

    def __init__(self, *, owner: SlotOwner, **kwargs: Any) -> None:
        self._owner = owner
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        # Every (re)connect goes through here: a pool's checkout (connect()) and the retry of a
        # command whose connection was dropped (send_packed_command). Resolving only in
        # connect() sent those retries to the old owner again, so the first call after a
        # failover or a slot migration failed with every retry.
        if self._sock:
            return
        try:
            self.host, self.port = self._owner.address()
            super().connect_check_health(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            self._owner.stale()
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except (
            redis.exceptions.MovedError,
            redis.exceptions.AskError,
            redis.exceptions.ClusterDownError,
            redis.exceptions.TryAgainError,
            redis.exceptions.ReadOnlyError,
        ) as exc:
            self._owner.stale()
            self.disconnect()  # type: ignore[no-untyped-call]
            raise redis.exceptions.ConnectionError(f"rq's hash slot moved: {exc}") from exc


def listen_queue(connection: Any, settings: Settings) -> Queue:
    """The rq queue of listen jobs. JSON, not pickle: jobs carry only (sid, token, epoch)."""
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
