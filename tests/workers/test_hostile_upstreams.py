"""Hostile upstreams against a real worker process, and the upstream allowlist in a worker.

One ``python -m workers`` process reads a healthy session beside upstreams that dribble their
response head, send an endless line, a 10 MiB event, invalid UTF-8 or HTML, redirect in a
loop, or redirect to a cloud metadata address. Each ends in its own state with a clear error;
the process survives and its healthy session keeps flowing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, WorkerProcesses, eventually, running_worker

pytestmark = pytest.mark.timeout(90)

METADATA_URL = "http://169.254.169.254/latest/meta-data/"


@pytest.fixture
def hostile() -> Iterator[SSEUpstream]:
    with SSEUpstream(rate=50.0, heartbeat=0.5, oversized_bytes=10 * 1024 * 1024) as server:
        yield server


async def wait_for(pool: Pool, sid: str, state: str, error: str, timeout: float = 20) -> None:
    async def reached() -> bool:
        got = (await pool.states([sid]))[sid]
        return got.get("state") == state and error in got.get("last_error", "")

    async def describe() -> str:
        return repr((await pool.states([sid]))[sid])

    try:
        await eventually(reached, timeout)
    except AssertionError:
        raise AssertionError(f"{sid}: never {state!r} with {error!r}: {await describe()}") from None


async def test_a_worker_process_survives_hostile_upstreams(
    redis_server: RedisServer, worker_processes: WorkerProcesses, hostile: SSEUpstream
) -> None:
    pool = Pool(redis_server.url)
    try:
        proc = worker_processes.start(
            redis_server.url, "w-hostile", head_timeout=1.0, max_redirects=3
        )
        modes = {
            "slowloris": "slow_head",
            "endless-line": "oversized",
            "huge-event": "huge_event",
            "latin": "invalid_utf8",
            "html": "wrong_type",
            "loop": "redirect:" + hostile.url("loop"),
            "metadata": "redirect:" + METADATA_URL,
        }
        for sid, mode in modes.items():
            hostile.configure(sid, mode=mode)
        for sid in ["healthy", *modes]:
            await pool.control.claim(sid, hostile.url(sid))

        await wait_for(pool, "slowloris", "backoff", "no complete response head within 1s")
        await wait_for(pool, "endless-line", "backoff", "SSE line exceeds max_event_bytes")
        await wait_for(pool, "huge-event", "backoff", "event's data exceeds max_event_bytes")
        await wait_for(pool, "html", "backoff", "not text/event-stream")
        await wait_for(pool, "loop", "backoff", "redirected more than LP_MAX_REDIRECTS=3")
        await wait_for(pool, "metadata", "failed", "169.254.169.254 is a cloud metadata address")
        await wait_for(pool, "latin", "listening", "")
        assert all("\ufffd" in e["data"] for e in await pool.stream("latin"))

        # Retried, not given up: each bad upstream saw more than one connection.
        for sid in ("slowloris", "endless-line", "huge-event", "html"):
            await eventually(lambda s=sid: hostile.stats(s).connections_total >= 2, 10,
                             f"{sid} was not retried")  # fmt: skip
        assert hostile.stats("loop").connections_total >= 4  # the first request + 3 hops
        # The refused redirect failed the session for good: one request, lease released.
        assert hostile.stats("metadata").connections_total == 1
        assert await pool.redis.get("lp:{metadata}:lease") is None

        # The process is alive and its healthy session keeps flowing.
        assert proc.poll() is None
        before = len(await pool.stream("healthy"))

        async def flowing() -> bool:
            return len(await pool.stream("healthy")) >= before + 10

        await eventually(flowing, 10, "the healthy session stopped")
        assert proc.poll() is None
    finally:
        await pool.aclose()


async def test_the_worker_checks_the_resolved_address_against_the_allowlist(
    pool: Pool, upstream: SSEUpstream
) -> None:
    # "localhost" could resolve into 10.0.0.0/8, so declaring it is accepted; the worker sees
    # it resolve to loopback and refuses the connection. The literal fails the same way.
    by_name = f"http://localhost:{upstream.port}/events/by-name"
    async with running_worker(pool, upstream_allow="10.0.0.0/8"):
        await pool.control.claim("by-name", by_name)
        await pool.control.claim("literal", upstream.url("literal"))
        await wait_for(pool, "by-name", "failed", "is not in LP_UPSTREAM_ALLOW")
        await wait_for(pool, "literal", "failed", "127.0.0.1 is not in LP_UPSTREAM_ALLOW")
    assert upstream.stats("by-name").connections_total == 0
    assert upstream.stats("literal").connections_total == 0
    # Named in the allowlist, the same upstream is read.
    async with running_worker(pool, upstream_allow="localhost"):
        await pool.control.claim("allowed", f"http://localhost:{upstream.port}/events/allowed")
        await wait_for(pool, "allowed", "listening", "")
