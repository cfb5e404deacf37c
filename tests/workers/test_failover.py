"""Ownership under failure, with real worker processes and private redis-servers.

Every test asserts from outside: what the upstream saw (connections, Last-Event-ID, disconnect
times) and what Redis holds (states, history streams).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from listenerpool.control import ClaimOutcome
from listenerpool.settings import Settings
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.tcpproxy import TCPProxy
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import BACKENDS, Pool, WorkerProcesses, eventually, fast_settings

pytestmark = pytest.mark.timeout(120)

TIMING: Settings = fast_settings()
# How long what leases drive (a self-fence, a move) may take on a loaded machine: for a move a
# lease must lapse (a TTL), a reconciler wake (an interval), then the new readers connect and
# report. How fast a move goes is bench/failover.py's measure, not a test's.
LEASE_DEADLINE = 8 * TIMING.lease_ttl + TIMING.reconcile_period
# The drain test's leases: far longer than any hand-over, so sessions listening elsewhere
# before the first of them could lapse were handed over, not left to expire.
DRAIN_LEASE_TTL = 30.0


@pytest.fixture
def slow_upstream() -> Iterator[SSEUpstream]:
    """Ten events per second per session: hundreds of sessions stay cheap on two cores."""
    with SSEUpstream(rate=10.0, heartbeat=0.5) as server:
        yield server


async def wait_listening(
    pool: Pool, sids: list[str], owner: str | None = None, timeout: float = 20
) -> dict[str, dict[str, str]]:
    async def ready() -> bool:
        states = await pool.states(sids)
        return all(
            s.get("state") == "listening" and (owner is None or s.get("owner") == owner)
            for s in states.values()
        )

    await eventually(ready, timeout, f"not all {len(sids)} sessions listening on {owner}")
    return await pool.states(sids)


async def wait_min_events(pool: Pool, sids: list[str], count: int, timeout: float = 40) -> None:
    async def enough() -> bool:
        for sid in sids:
            if await pool.redis.xlen(f"lp:{{{sid}}}:events") < count:
                return False
        return True

    await eventually(enough, timeout, f"sessions have fewer than {count} events")


async def assert_exactly_once_in_order(pool: Pool, sid: str) -> list[dict[str, str]]:
    entries = await pool.stream(sid)
    numbers = [SSEUpstream.number_of(e["data"]) for e in entries]
    assert numbers == list(range(1, len(numbers) + 1)), f"{sid}: lost, duplicated or reordered"
    assert [int(e["seq"]) for e in entries] == list(range(1, len(entries) + 1))
    epochs = [int(e["epoch"]) for e in entries]
    assert epochs == sorted(epochs), f"{sid}: an old epoch wrote after a newer one"
    return entries


def assert_resumed(upstream: SSEUpstream, sid: str, since: float, at_least: int) -> None:
    """No reader of ``sid`` started over: each connection after the first sent a Last-Event-ID,
    and each opened since ``since`` (when ``at_least`` events were stored) one no lower. (A
    loaded machine may move a session before the test's own fault, after fewer events.)"""
    for conn in upstream.stats(sid).connections[1:]:
        assert conn.last_event_id, f"{sid}: a reader started over without Last-Event-ID"
        if conn.opened >= since:
            assert int(conn.last_event_id) >= at_least, f"{sid}: resumed at {conn.last_event_id}"


async def wait_registered(pool: Pool, worker_id: str) -> None:
    async def registered() -> bool:
        return await pool.redis.zscore("lp:workers", worker_id) is not None

    await eventually(registered, 15, f"worker {worker_id} never registered")


async def sessions_on_first_of_two_workers(
    pool: Pool,
    processes: WorkerProcesses,
    upstream: SSEUpstream,
    sids: list[str],
    names: tuple[str, str],
    first_redis_url: str | None = None,
    **settings: Any,
) -> tuple[subprocess.Popen[bytes], dict[str, dict[str, str]]]:
    """Start worker ``names[0]``, put every session on it, then start ``names[1]`` beside it
    (both with ``settings``). Returns the first worker's process and the session states once
    each has a few events."""
    first = processes.start(first_redis_url or pool.url, names[0], **settings)
    for sid in sids:
        await pool.control.claim(sid, upstream.url(sid))
    states = await wait_listening(pool, sids, owner=names[0])
    processes.start(pool.url, names[1], **settings)
    await wait_registered(pool, names[1])
    await wait_min_events(pool, sids, 5)
    return first, states


@BACKENDS
async def test_racing_claimers_get_exactly_one_reader_per_session(
    redis_url: str, slow_upstream: SSEUpstream, worker_processes: WorkerProcesses
) -> None:
    worker_processes.start(redis_url, "race-a")
    worker_processes.start(redis_url, "race-b")
    claimers = [Pool(redis_url) for _ in range(4)]
    sids = [f"race{i}" for i in range(200)]
    try:
        results = await asyncio.gather(
            *(c.control.claim(sid, slow_upstream.url(sid)) for sid in sids for c in claimers)
        )
        outcomes = Counter(r.outcome for r in results)
        assert outcomes == {ClaimOutcome.CREATED: 200, ClaimOutcome.UNCHANGED: 600}
        pool = claimers[0]
        states = await wait_listening(pool, sids, timeout=30)
        assert {s["owner"] for s in states.values()} <= {"race-a", "race-b"}
        # Let every reader run a while (at least a lease TTL's worth of events) before judging.
        await wait_min_events(pool, sids, 25)
        for sid in sids:
            stats = slow_upstream.stats(sid)
            assert stats.max_concurrent == 1, f"{sid}: {stats.max_concurrent} readers at once"
            if stats.connections_total > 1:
                # A second connection is legitimate only after the lease changed hands (a
                # reader that self-fenced when a renewal round overran, then a re-claim);
                # a duplicate job would have left the epoch alone.
                status = await pool.control.status(sid)
                assert status is not None and status.epoch > 1, (
                    f"{sid}: {stats.connections_total} connections at epoch 1"
                )
            await assert_exactly_once_in_order(pool, sid)
        assert pool.queue.count == 0
    finally:
        for c in claimers:
            await c.aclose()


@BACKENDS
async def test_sigkill_of_a_worker_moves_its_100_sessions_without_loss(
    redis_url: str, slow_upstream: SSEUpstream, worker_processes: WorkerProcesses
) -> None:
    pool = Pool(redis_url)
    sids = [f"kill{i}" for i in range(100)]
    try:
        victim, _ = await sessions_on_first_of_two_workers(
            pool, worker_processes, slow_upstream, sids, ("kill-a", "kill-b")
        )

        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        states = await wait_listening(pool, sids, owner="kill-b", timeout=LEASE_DEADLINE)
        assert all(int(s["epoch"]) >= 2 for s in states.values())

        for sid in sids:
            assert_resumed(slow_upstream, sid, since=killed_at, at_least=5)
        await wait_min_events(pool, sids, 5 + 20)
        for sid in sids:
            await assert_exactly_once_in_order(pool, sid)
            assert slow_upstream.stats(sid).max_concurrent == 1
    finally:
        await pool.aclose()


async def test_a_partitioned_worker_fences_itself_before_its_leases_expire(
    redis_server: RedisServer, upstream: SSEUpstream, worker_processes: WorkerProcesses
) -> None:
    pool = Pool(redis_server.url)
    sids = [f"part{i}" for i in range(20)]
    with TCPProxy(redis_server.port) as proxy:
        try:
            _, before = await sessions_on_first_of_two_workers(
                pool,
                worker_processes,
                upstream,
                sids,
                ("part-a", "part-b"),
                first_redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            )

            proxy.set_mode("stall")
            # When each lease would expire, read from Redis directly (not through the proxy).
            # The clock is read before the call: the expiry found is never later than Redis's.
            expiry = {}
            for sid in sids:
                asked_at = time.monotonic()
                pttl = await pool.redis.pttl(f"lp:{{{sid}}}:lease")
                expiry[sid] = asked_at + pttl / 1000
            await eventually(
                lambda: all(len(upstream.stats(sid).disconnects) >= 1 for sid in sids),
                LEASE_DEADLINE,
                "the partitioned worker kept reading",
            )
            leads = []
            for sid in sids:
                fenced_at = upstream.stats(sid).disconnects[0]
                # Behaviour, not speed: the lease's own expiry is the bound. A reader still
                # reading after it could overlap the next owner's.
                assert fenced_at < expiry[sid], f"{sid}: reader outlived its lease"
                leads.append(expiry[sid] - fenced_at)
            print(f"partition: readers stopped {min(leads):.2f}-{max(leads):.2f}s before expiry")

            after = await wait_listening(pool, sids, owner="part-b", timeout=LEASE_DEADLINE)
            for sid in sids:
                assert int(after[sid]["epoch"]) > int(before[sid]["epoch"])
            await wait_min_events(pool, sids, 20)

            proxy.set_mode("pass")  # the old owner comes back: it must not resume anything
            await wait_registered(pool, "part-a")
            await wait_min_events(pool, sids, 40)
            for sid in sids:
                await assert_exactly_once_in_order(pool, sid)
                stats = upstream.stats(sid)
                assert stats.max_concurrent == 1, f"{sid}: two readers at once"
                assert stats.concurrent == 1
        finally:
            await pool.aclose()


@BACKENDS
async def test_sigterm_hands_every_session_to_another_worker_without_loss(
    redis_url: str, slow_upstream: SSEUpstream, worker_processes: WorkerProcesses
) -> None:
    pool = Pool(redis_url, lease_ttl=DRAIN_LEASE_TTL)
    sids = [f"term{i}" for i in range(50)]
    try:
        leaving, _ = await sessions_on_first_of_two_workers(
            pool,
            worker_processes,
            slow_upstream,
            sids,
            ("term-a", "term-b"),
            lease_ttl=DRAIN_LEASE_TTL,
        )

        # The first of the leases to lapse, read before the calls (never later than Redis's).
        asked_at = time.monotonic()
        pttls = [await pool.redis.pttl(f"lp:{{{sid}}}:lease") for sid in sids]
        first_lapse = asked_at + min(pttls) / 1000
        leaving.send_signal(signal.SIGTERM)
        # Behaviour, not speed: the bound is the leases' own expiry. Moved before any lease
        # could lapse, the sessions were handed over by the drain, not left to expire.
        await wait_listening(pool, sids, owner="term-b", timeout=first_lapse - time.monotonic())
        assert await asyncio.to_thread(leaving.wait, 30) == 0
        assert await pool.redis.zscore("lp:workers", "term-a") is None

        await wait_min_events(pool, sids, 5 + 20)
        for sid in sids:
            await assert_exactly_once_in_order(pool, sid)
            assert slow_upstream.stats(sid).max_concurrent == 1
    finally:
        await pool.aclose()


async def test_redis_killed_and_restarted_sessions_resume(
    persistent_redis_server: RedisServer,
    slow_upstream: SSEUpstream,
    worker_processes: WorkerProcesses,
) -> None:
    server = persistent_redis_server
    sids = [f"rr{i}" for i in range(10)]
    worker = worker_processes.start(server.url, "rr-a")
    pool = Pool(server.url)
    try:
        for sid in sids:
            await pool.control.claim(sid, slow_upstream.url(sid))
        await wait_listening(pool, sids, owner="rr-a")
        await wait_min_events(pool, sids, 5)
    finally:
        await pool.aclose()

    server.kill()
    # Without Redis no renewal succeeds: every reader fences itself.
    await eventually(lambda: slow_upstream.total_concurrent() == 0, LEASE_DEADLINE,
                     "readers kept running without Redis")  # fmt: skip
    assert worker.poll() is None
    server.start()

    pool = Pool(server.url)
    try:
        await wait_listening(pool, sids, owner="rr-a", timeout=20)
        await wait_min_events(pool, sids, 15)
        for sid in sids:
            await assert_exactly_once_in_order(pool, sid)
        assert worker.poll() is None, "the worker died with Redis"
    finally:
        await pool.aclose()


async def test_a_worker_started_before_redis_waits_for_it(
    slow_upstream: SSEUpstream, worker_processes: WorkerProcesses
) -> None:
    server = RedisServer()  # not started yet: the worker comes up first
    worker = worker_processes.start(server.url, "early")
    try:
        # It must survive its failed connection attempts (the log shows them).
        await eventually(lambda: "Error" in worker_processes.log("early"), 10, "no attempt seen")
        assert worker.poll() is None
        server.start()
        pool = Pool(server.url)
        try:
            await wait_registered(pool, "early")
            await pool.control.claim("late", slow_upstream.url("late"))
            await wait_listening(pool, ["late"], owner="early")
            assert worker.poll() is None
        finally:
            await pool.aclose()
    finally:
        server.stop()
