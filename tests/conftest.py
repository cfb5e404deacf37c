"""Shared fixtures: real redis-server processes on free ports, fakeredis, the test upstream,
worker processes and in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from listenerpool import keys
from listenerpool.connections import async_redis, listen_queue, sync_redis
from listenerpool.control import SessionControl
from listenerpool.settings import Settings, load_settings
from listenerpool.testing.harness import processes
from listenerpool.testing.harness.redis_cluster import RedisClusterNodes
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.tasks import task_stack
from workers.worker import Worker

# Every test ends its tasks and its teardown within a deadline (see tests/teardown.py).
pytest_plugins = ["tests.teardown"]

ROOT = processes.ROOT


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


async def eventually(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float, message: str = ""
) -> None:
    """Poll ``predicate`` (sync or async) every 20 ms until true; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


# -- Redis -------------------------------------------------------------------------------------
@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server that the test may kill, pause or restart."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def persistent_redis_server() -> Iterator[RedisServer]:
    """A private redis-server with an fsync-always AOF: a kill + start keeps the data."""
    with RedisServer(persistent=True) as server:
        yield server


# Run a test on one Redis server and on a Redis Cluster, switched only by its Redis URL:
# ``@BACKENDS`` over a test that takes ``redis_url`` (or ``pool``).
BACKENDS = pytest.mark.parametrize("backend", ["single", "cluster"])


@pytest.fixture
def backend() -> str:
    """What ``redis_url`` names: ``single`` (default) or ``cluster`` (see ``BACKENDS``)."""
    return "single"


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[RedisClusterNodes]:
    """One Redis Cluster (3 primaries, 3 replicas) for the whole run; emptied between tests.
    Tests that fail over or reshape a cluster start their own."""
    with RedisClusterNodes() as cluster:
        yield cluster


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, backend: str) -> Iterator[str]:
    """A Redis for tests that only need one. On the ``cluster`` backend, the shared cluster.
    Otherwise ``LP_TEST_REDIS_URL`` (a database the tests own; its ``lp:*`` and rq keys are
    deleted before and after) or a private server."""
    if backend == "cluster":
        cluster: RedisClusterNodes = request.getfixturevalue("shared_cluster")
        _flush(cluster)
        yield cluster.url
        _flush(cluster)
        return
    given = os.environ.get("LP_TEST_REDIS_URL")
    if not given:
        server: RedisServer = request.getfixturevalue("redis_server")
        yield server.url
        return
    _delete_pool_keys(given)
    yield given
    _delete_pool_keys(given)


def _flush(cluster: RedisClusterNodes) -> None:
    for port in cluster.primary_ports():
        with cluster.client(port) as client:
            client.flushall()


def _delete_pool_keys(url: str) -> None:
    client = redis.Redis.from_url(url)
    for pattern in ("lp:*", "rq:*", "{rq}:*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    client.close()


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
async def fake_redis(fake_server: fakeredis.FakeServer) -> AsyncIterator[Any]:
    client = fakeredis.FakeAsyncRedis(server=fake_server)
    yield client
    await client.aclose()


@pytest.fixture
def fake_sync_redis(fake_server: fakeredis.FakeServer) -> Iterator[Any]:
    client = fakeredis.FakeRedis(server=fake_server)
    yield client
    client.close()


# -- settings and control ----------------------------------------------------------------------
FAST = {
    "lease_ttl": 2.0,
    "idle_timeout": 3.0,
    "backoff_base": 0.05,
    "backoff_cap": 0.5,
    "connect_timeout": 2.0,
}


def fast_settings(**overrides: Any) -> Settings:
    """Short TTLs and backoffs so failovers happen in seconds."""
    return load_settings(**{**FAST, **overrides})


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[Pool]:
    p = Pool(redis_url)
    yield p
    await p.aclose()


class Pool:
    """Clients of one test Redis: asyncio client, rq queue and the control API."""

    def __init__(self, url: str, **settings: Any) -> None:
        self.url = url
        self.settings = fast_settings(redis_url=url, **settings)
        self.redis = async_redis(self.settings)
        self.sync = sync_redis(self.settings)
        self.queue = listen_queue(self.sync, self.settings)
        self.control = SessionControl(self.redis, self.queue, self.settings)

    async def states(self, sids: list[str]) -> dict[str, dict[str, str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hgetall(f"lp:{{{sid}}}:state")
            replies = await pipe.execute()
        return {
            sid: {k.decode(): v.decode() for k, v in reply.items()}
            for sid, reply in zip(sids, replies, strict=True)
        }

    async def indexed(self, which: str) -> set[str]:
        """Session ids in every bucket of the ``"leases"`` or ``"sessions"`` index."""
        name = keys.lease_index if which == "leases" else keys.sessions_index
        found: set[str] = set()
        for bucket in range(keys.INDEX_BUCKETS):
            found |= {m.decode() for m in await self.redis.zrange(name(bucket), 0, -1)}
        return found

    async def stream(self, sid: str) -> list[dict[str, str]]:
        entries = await self.redis.xrange(f"lp:{{{sid}}}:events")
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]

    async def aclose(self) -> None:
        await self.redis.aclose()
        self.sync.close()


# -- upstream ----------------------------------------------------------------------------------
@pytest.fixture
def upstream() -> Iterator[SSEUpstream]:
    with SSEUpstream(rate=50.0, heartbeat=0.5) as server:
        yield server


# -- workers -----------------------------------------------------------------------------------
class WorkerProcesses(processes.WorkerProcesses):
    """``python -m workers`` children with the test's timings."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, FAST)


@pytest.fixture
def worker_processes(tmp_path: Path) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(tmp_path)
    yield procs
    procs.stop_all()


@contextlib.asynccontextmanager
async def running_worker(
    pool: Pool,
    worker_id: str = "w-inproc",
    rand: Callable[[float, float], float] | None = None,
    **settings: Any,
) -> AsyncIterator[Worker]:
    """An in-process worker on the test's loop, drained on exit."""
    worker_settings = fast_settings(redis_url=pool.url, **settings)
    extra: dict[str, Any] = {"rand": rand} if rand else {}
    worker = Worker(
        worker_settings, redis=pool.redis, queue=pool.queue, worker_id=worker_id, **extra
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await eventually(worker.ready.is_set, 10, "worker did not start")
    try:
        yield worker
    finally:
        stop.set()
        done, _ = await asyncio.wait([task], timeout=15)
        if not done:
            stacks = "\n".join(f"{t.get_name()}: {task_stack(t)}" for t in asyncio.all_tasks())
            task.cancel()
            raise AssertionError(f"worker did not drain within 15 s; tasks:\n{stacks}")
        task.result()


# -- gateways ----------------------------------------------------------------------------------
class GatewayProcesses(processes.GatewayProcesses):
    """``python -m gateway`` children on free ports, with the test's timings."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, FAST)


@pytest.fixture
def gateway_processes(tmp_path: Path) -> Iterator[GatewayProcesses]:
    procs = GatewayProcesses(tmp_path)
    yield procs
    procs.stop_all()
