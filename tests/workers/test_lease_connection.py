"""A worker renews its leases over connections of their own, and takes no new session while
its renewal rounds run late.

Readers publish, report and re-assert through the worker's command client, whose callers queue
for its connections when all are busy. Were the renewals queued behind them, a burst of
publishes (or a slow reply holding every connection) would leave the lease clocks unconfirmed
and readers whose leases Redis holds would fence themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from listenerpool import keys
from listenerpool.connections import LEASE_CONNECTIONS, async_redis
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker
from workers.worker import Worker

TTL = 3.0
# A lease clock runs out this long after its last confirmed renewal.
FENCE_AFTER = TTL - TTL / 5
# Deadlines a loaded machine meets: a few lease TTLs.
DEADLINE = 5 * TTL
COMMAND_CONNECTIONS = 4
HELD_ROUNDS_MARGIN = 0.2


@pytest.fixture
def quiet_upstream() -> Iterator[SSEUpstream]:
    """Two events per session, then nothing: no publish waits while the test holds the
    command connection."""
    with SSEUpstream(rate=20.0, total=2, heartbeat=0) as server:
        yield server


async def take_every_connection(client: Any) -> list[Any]:
    """Every connection left in ``client``'s pool, which makes a caller wait for one once none
    is free."""
    taken = []
    while True:
        try:
            taken.append(await asyncio.wait_for(client.connection_pool.get_connection(), 1))
        except TimeoutError:
            return taken


async def heartbeat_ms(pool: Pool, worker_id: str) -> int:
    value = await pool.redis.hget(keys.worker_key(worker_id), "heartbeat")
    return int(value) if value else 0


async def test_renewals_go_on_while_every_command_connection_is_busy(
    redis_server: RedisServer, quiet_upstream: SSEUpstream
) -> None:
    pool = Pool(redis_server.url, lease_ttl=TTL)
    # The worker's command client, whose free connections the test takes from it below (its
    # control subscription keeps one of them).
    commands = async_redis(pool.settings, max_connections=COMMAND_CONNECTIONS)
    leases = async_redis(pool.settings, max_connections=LEASE_CONNECTIONS)
    worker = Worker(
        pool.settings, redis=commands, lease_redis=leases, queue=pool.queue, worker_id="w-lease"
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    held: list[Any] = []
    try:
        await eventually(worker.ready.is_set, DEADLINE, "worker did not start")
        sids = [f"lease-conn-{n}" for n in range(3)]
        for sid in sids:
            await pool.control.claim(sid, quiet_upstream.url(sid))

        async def all_listening() -> bool:
            states = await pool.states(sids)
            if any(s.get("state") != "listening" for s in states.values()):
                return False
            return all([len(await pool.stream(sid)) == 2 for sid in sids])

        await eventually(all_listening, DEADLINE, "sessions not listening with their events")
        readers = {sid: worker.reader(sid) for sid in sids}
        leases_before = {sid: await pool.redis.get(keys.SessionKeys(sid).lease) for sid in sids}

        held.extend(await take_every_connection(commands))
        assert held, "the command client had no free connection to take"
        busy_since_ms = int(time.time() * 1000)

        # Heartbeats go with each renewal round; one written after every clock would have run
        # out since the command connection was taken shows the rounds went on.
        async def renewed_past_fence() -> bool:
            return await heartbeat_ms(pool, "w-lease") > busy_since_ms + FENCE_AFTER * 1000

        await eventually(
            renewed_past_fence,
            DEADLINE,
            "no renewal round completed while the command connection was busy",
        )
        fences = worker.metrics.registry.get_sample_value("listenerpool_self_fences_total")
        assert not fences, "a reader fenced itself"
        assert {sid: worker.reader(sid) for sid in sids} == readers, "a reader was replaced"
        for sid in sids:
            assert await pool.redis.get(keys.SessionKeys(sid).lease) == leases_before[sid]
            assert await pool.redis.pttl(keys.SessionKeys(sid).lease) > 0
    finally:
        for connection in held:
            await commands.connection_pool.release(connection)
        stop.set()
        done, _ = await asyncio.wait([task], timeout=DEADLINE)
        if not done:
            task.cancel()
        await commands.aclose()
        await leases.aclose()
        await pool.aclose()
        assert done, "worker did not drain"


async def test_renewals_go_on_a_connection_of_their_own_made_again_when_cut(
    redis_server: RedisServer, quiet_upstream: SSEUpstream
) -> None:
    """On a single server a worker sends its renewal rounds on a script channel of its own.
    Every client connection cut by the server (``CLIENT KILL``) is made again, the rounds go
    on, and no reader fences itself."""
    pool = Pool(redis_server.url, lease_ttl=TTL)
    try:
        async with running_worker(pool, "w-channel", lease_ttl=TTL) as worker:
            channel = worker.lease_channel
            assert channel is not None, "no lease channel on a plain single server"
            sids = [f"lease-channel-{n}" for n in range(3)]
            for sid in sids:
                await pool.control.claim(sid, quiet_upstream.url(sid))

            async def all_listening() -> bool:
                states = await pool.states(sids)
                return all(s.get("state") == "listening" for s in states.values())

            await eventually(all_listening, DEADLINE, "sessions not listening")
            await eventually(lambda: channel.connects == 1, DEADLINE, "no round on the channel")
            readers = {sid: worker.reader(sid) for sid in sids}

            await pool.redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            cut_ms = int(time.time() * 1000)
            await eventually(lambda: channel.connects == 2, DEADLINE, "channel not made again")

            async def renewed_past_fence() -> bool:
                return await heartbeat_ms(pool, "w-channel") > cut_ms + FENCE_AFTER * 1000

            await eventually(renewed_past_fence, DEADLINE, "no renewal round after the cut")
            fences = worker.metrics.registry.get_sample_value("listenerpool_self_fences_total")
            assert not fences, "a reader fenced itself"
            assert {sid: worker.reader(sid) for sid in sids} == readers, "a reader was replaced"
            for sid in sids:
                assert await pool.redis.pttl(keys.SessionKeys(sid).lease) > 0
    finally:
        await pool.aclose()


async def test_a_worker_whose_renewals_run_late_takes_no_new_session(
    redis_server: RedisServer, quiet_upstream: SSEUpstream
) -> None:
    """A worker whose renewal rounds are still under way a whole interval after they were
    sent takes no new session, and takes them again once the rounds end. Its renewals are
    held up here by taking every connection of its lease client (as a saturated loop would
    hold them up); a session claimed meanwhile goes to a second worker, and when that one
    drains, the first, on time again, takes it."""
    # Rounds go out every TTL/3 and each waits for a connection until its deadline, TTL less
    # the margin: with this margin each late round is still under way 0.8 s after the next one
    # is found late, so the hold lasts, without a gap, for as long as the connections are held
    # (the loop would have to run 0.8 s late to open one).
    pool = Pool(redis_server.url, lease_ttl=TTL, lease_margin=HELD_ROUNDS_MARGIN)
    commands = async_redis(pool.settings)
    leases = async_redis(pool.settings, max_connections=LEASE_CONNECTIONS)
    late = Worker(
        pool.settings, redis=commands, lease_redis=leases, queue=pool.queue, worker_id="w-late"
    )
    other = Worker(pool.settings, redis=commands, queue=pool.queue, worker_id="w-other")
    stop_late, stop_other = asyncio.Event(), asyncio.Event()
    late_task = asyncio.create_task(late.run(stop_late))
    other_task: asyncio.Task[None] | None = None
    held: list[Any] = []

    def holds() -> float:
        value = late.metrics.registry.get_sample_value("listenerpool_admission_holds_total")
        return value or 0.0

    try:
        await eventually(late.ready.is_set, DEADLINE, "worker did not start")
        held.extend(await take_every_connection(leases))
        assert held, "the lease client had no free connection to take"
        await eventually(lambda: holds() >= 1, DEADLINE, "late renewal rounds held nothing")

        sid = "late-renewals-0"
        await pool.control.claim(sid, quiet_upstream.url(sid))
        other_task = asyncio.create_task(other.run(stop_other))
        await eventually(
            lambda: other.reader(sid) is not None, DEADLINE, "the session did not go elsewhere"
        )
        # What must have happened, whatever the time it took: taken by the late worker, the
        # session would have been fenced there (no renewal confirmed) before going to the
        # other, so a worker holding no reader and counting no fence never took it.
        assert late.reader(sid) is None, "the worker whose renewals ran late took the session"
        fenced = late.metrics.registry.get_sample_value("listenerpool_self_fences_total")
        assert not fenced, "the worker whose renewals ran late took the session and fenced it"

        for connection in held:
            await leases.connection_pool.release(connection)
        held.clear()
        await eventually(late.healthy, DEADLINE, "the late worker's renewals did not resume")
        stop_other.set()
        await eventually(
            lambda: late.reader(sid) is not None,
            DEADLINE,
            "the worker on time again did not take the session handed over",
        )

        async def listening() -> bool:
            return (await pool.states([sid]))[sid].get("state") == "listening"

        await eventually(listening, DEADLINE, "the session taken over is not listening")
    finally:
        for connection in held:
            await leases.connection_pool.release(connection)
        stop_late.set()
        stop_other.set()
        tasks = [t for t in (late_task, other_task) if t is not None]
        _, pending = await asyncio.wait(tasks, timeout=DEADLINE)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await commands.aclose()
        await leases.aclose()
        await pool.aclose()
        assert not pending, "a worker did not drain"
