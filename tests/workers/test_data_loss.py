"""Redis loses every key (restarted without persistence, as a failover to an empty replica
would do): the workers that run the sessions write them back and the sessions go on, with seq
continuing so that clients resume without a gap or a duplicate."""

from __future__ import annotations

import time

import pytest

from listenerpool import keys
from listenerpool.testing.harness.followers import Follower
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import GatewayProcesses, Pool, WorkerProcesses, eventually
from tests.workers.test_failover import slow_upstream, wait_listening, wait_min_events

__all__ = ["slow_upstream"]  # a fixture, imported for pytest

pytestmark = pytest.mark.timeout(120)


async def stream_numbers(pool: Pool, sid: str) -> list[tuple[int, int, int]]:
    """(seq, epoch, upstream number) of every entry in the session's history."""
    return [
        (int(e["seq"]), int(e["epoch"]), SSEUpstream.number_of(e["data"]))
        for e in await pool.stream(sid)
    ]


async def test_sessions_survive_redis_losing_all_data(
    redis_server: RedisServer,
    slow_upstream: SSEUpstream,
    worker_processes: WorkerProcesses,
    gateway_processes: GatewayProcesses,
) -> None:
    sids = [f"dl{i}" for i in range(30)]
    worker_processes.start(redis_server.url, "dl-a")
    worker_processes.start(redis_server.url, "dl-b")
    _, base = gateway_processes.start(redis_server.url, "dl-gw")
    pool = Pool(redis_server.url)
    followers = [Follower(base, sid) for sid in sids[:5]]
    try:
        for sid in sids:
            await pool.control.claim(sid, slow_upstream.url(sid))
        before = await wait_listening(pool, sids)
        for follower in followers:
            follower.start()
        await wait_min_events(pool, sids, 10)
        seq_before = {sid: int((await pool.states([sid]))[sid]["seq"]) for sid in sids}

        redis_server.restart()  # no persistence: it comes back empty
        lost_at = time.monotonic()

        after = await wait_listening(pool, sids, timeout=15)
        print(f"data loss: all sessions listening again after {time.monotonic() - lost_at:.2f}s")
        for sid in sids:
            assert int(after[sid]["epoch"]) > int(before[sid]["epoch"]), sid
            assert after[sid]["owner"] == before[sid]["owner"], "re-asserted by its runner"
        # The indexes are rebuilt: listing and the reconciler see every session again.
        assert await pool.indexed("sessions") == set(sids)
        assert await pool.indexed("leases") == set(sids)

        # Seq continues where it was, and the recent history (LP_RESTORE_EVENTS, 64 here
        # more than the whole history) was written back by the worker.
        await wait_min_events(pool, sids, seq_before[sids[0]] + 10)
        for sid in sids:
            assert await pool.redis.hget(keys.SessionKeys(sid).spec, "restored"), sid
            entries = await stream_numbers(pool, sid)
            assert entries[0][0] == 1, f"{sid}: history not written back"
            assert all(seq == number for seq, _, number in entries), f"{sid}: seq != event"
            assert [seq for seq, _, _ in entries] == list(
                range(entries[0][0], entries[0][0] + len(entries))
            )
            assert slow_upstream.stats(sid).max_concurrent == 1, f"{sid}: two readers"

        # Clients saw every event once, in order, across the loss.
        target = {f.sid: max(n for _, _, n in await stream_numbers(pool, f.sid)) for f in followers}
        await eventually(
            lambda: all(f.last_seq >= target[f.sid] for f in followers), 15, "clients behind"
        )
        for follower in followers:
            numbers = [r.number for r in follower.received]
            assert numbers == list(range(1, len(numbers) + 1)), f"{follower.sid}: gap or dup"
            assert all(r.seq == r.number for r in follower.received)
            assert follower.resets == []
            epochs = [r.epoch for r in follower.received]
            assert epochs == sorted(epochs) and epochs[-1] > epochs[0]
    finally:
        for follower in followers:
            await follower.stop()
        await pool.aclose()


async def test_a_session_without_a_running_reader_is_lost_with_the_data(
    redis_server: RedisServer, slow_upstream: SSEUpstream, worker_processes: WorkerProcesses
) -> None:
    """What the loss takes: a session claimed but not yet adopted (its listen job was in the
    lost queue) is gone; a running one is back."""
    pool = Pool(redis_server.url)
    try:
        await pool.control.claim("queued", slow_upstream.url("queued"))  # no worker yet
        redis_server.restart()
        worker_processes.start(redis_server.url, "late")
        await pool.control.claim("fresh", slow_upstream.url("fresh"))
        await wait_listening(pool, ["fresh"], owner="late")
        assert await pool.redis.exists(keys.SessionKeys("queued").spec) == 0
        assert slow_upstream.stats("queued").connections_total == 0
    finally:
        await pool.aclose()


async def test_the_history_written_back_reaches_past_a_take_over(
    redis_server: RedisServer, slow_upstream: SSEUpstream, worker_processes: WorkerProcesses
) -> None:
    """A worker that took a session over writes back the events before its take-over too: it
    loads them from the history when it adopts the session."""
    pool = Pool(redis_server.url)
    try:
        first = worker_processes.start(redis_server.url, "to-a")
        await pool.control.claim("to", slow_upstream.url("to"))
        await wait_listening(pool, ["to"], owner="to-a")
        await wait_min_events(pool, ["to"], 10)
        first.kill()
        worker_processes.start(redis_server.url, "to-b")
        await wait_listening(pool, ["to"], owner="to-b", timeout=20)
        taken_over_at = int((await pool.states(["to"]))["to"]["seq"])
        await wait_min_events(pool, ["to"], taken_over_at + 5)

        redis_server.restart()  # empty again
        await wait_listening(pool, ["to"], owner="to-b", timeout=15)
        entries = await stream_numbers(pool, "to")
        assert entries[0][0] == 1, "history before the take-over was not written back"
        assert all(seq == number for seq, _, number in entries)
    finally:
        await pool.aclose()
