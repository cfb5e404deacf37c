"""Which Redis node serves a key's hash slot, and a client per node, for connections that must
be held on the right node themselves (sharded pub/sub subscriptions).

On one server, or a Sentinel-watched primary, there is one node and the pool's own client
serves it (Sentinel's connections find the current primary when they connect). On a cluster the
slot map is the cluster client's, refreshed on demand after a MOVED reply, a ``sunsubscribe``
from a node that lost a slot, or a lost connection.
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

SINGLE_NODE = "primary"


class Topology:
    """The nodes behind ``redis`` (the pool's asyncio client, never closed here)."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self.clustered = isinstance(redis, RedisCluster)
        self._clients: dict[str, Any] = {}

    async def node_of(self, key: str) -> str:
        """The name of the primary serving ``key``'s slot (``host:port`` on a cluster).
        Raises the client's errors when the slot map cannot be read."""
        if not self.clustered:
            return SINGLE_NODE
        await self._redis.initialize()  # a no-op once the slot map is loaded
        node = self._redis.get_node_from_key(key)
        if node is None:
            raise redis.exceptions.SlotNotCoveredError(f"no node serves {key!r}")
        return str(node.name)

    async def refresh(self) -> None:
        """Read the slot map again (a cluster's only)."""
        if self.clustered:
            await self._redis.nodes_manager.initialize()

    def is_primary(self, node: str) -> bool:
        if not self.clustered:
            return True
        found = self._redis.get_node(node_name=node)
        return found is not None and found.server_type == "primary"

    def client(self, node: str) -> Any:
        """A client whose connections go to ``node`` only. On a cluster its connections do not
        retry by themselves: a lost connection must reach the caller, who re-reads the slot
        map before reconnecting."""
        if not self.clustered:
            return self._redis
        client = self._clients.get(node)
        if client is None:
            known = self._redis.get_node(node_name=node)
            if known is None:
                raise redis.exceptions.ConnectionError(f"{node} is not a node of the cluster")
            kwargs = {**known.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
            pool = aioredis.ConnectionPool(connection_class=known.connection_class, **kwargs)
            client = aioredis.Redis.from_pool(pool)
            self._clients[node] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await client.aclose()
