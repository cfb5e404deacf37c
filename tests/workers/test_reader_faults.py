"""Readers against a misbehaving upstream: silence, errors, malformed streams, cancel, leaks.

An in-process worker on a private redis-server; the test upstream runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psutil
import pytest
import redis.exceptions

import workers.worker as worker_module
from listenerpool.keys import SessionKeys
from listenerpool.lease import LeaseClock
from listenerpool.metrics import ReconnectReason, WorkerMetrics
from listenerpool.spec import UpstreamSpec
from listenerpool.tasks import cancel_until_done
from listenerpool.testing.redis_server import RedisServer, free_port
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, fast_settings, running_worker
from workers.publisher import Publisher
from workers.reader import Reader
from workers.renewal import RenewVerdict
from workers.session import HeldSession
from workers.upstream import UpstreamClient
from workers.worker import StopReason, Worker

pytestmark = pytest.mark.timeout(60)

# How long a step may take on a loaded machine (a reader starting or stopping, a state
# reported, a retry): a deadline for the test to fail at, not a speed to meet.
DEADLINE = 10.0


async def state_of(pool: Pool, sid: str) -> dict[str, str]:
    return (await pool.states([sid]))[sid]


async def wait_state(pool: Pool, sid: str, state: str, timeout: float = 10) -> dict[str, str]:
    async def reached() -> bool:
        return (await state_of(pool, sid)).get("state") == state

    await eventually(reached, timeout, f"{sid} never reached state {state!r}")
    return await state_of(pool, sid)


async def wait_events(pool: Pool, sid: str, count: int, timeout: float = 10) -> None:
    async def enough() -> bool:
        return len(await pool.stream(sid)) >= count

    await eventually(enough, timeout, f"{sid}: fewer than {count} events stored")


async def assert_gapless(pool: Pool, sid: str) -> list[int]:
    numbers = [SSEUpstream.number_of(e["data"]) for e in await pool.stream(sid)]
    assert numbers == list(range(1, len(numbers) + 1)), f"{sid}: lost or duplicated events"
    return numbers


async def test_a_cancel_notice_alone_closes_the_upstream_connection(
    pool: Pool, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notice on lp:ctl stops the reader; the renewal's tombstone check (the backstop, see
    the missed-notice test) is kept from seeing the cancel, so nothing else can have."""
    real = worker_module.renew_all

    async def blind_to_cancels(*args: Any, **kwargs: Any) -> Any:
        verdicts = await real(*args, **kwargs)
        return [RenewVerdict.RENEWED if v is RenewVerdict.CANCELLED else v for v in verdicts]

    monkeypatch.setattr(worker_module, "renew_all", blind_to_cancels)
    async with running_worker(pool) as worker:
        await pool.control.claim("c1", upstream.url("c1"))
        await wait_state(pool, "c1", "listening")
        assert await pool.control.cancel("c1")
        await eventually(lambda: len(upstream.stats("c1").disconnects) == 1, DEADLINE,
                         "the upstream did not see the disconnect")  # fmt: skip
        state = await wait_state(pool, "c1", "stopped")
        assert state["owner"] == ""
        assert worker.held_sessions() == []
        assert await pool.redis.get("lp:{c1}:lease") is None


async def test_cancel_interrupts_a_30_second_backoff(pool: Pool, upstream: SSEUpstream) -> None:
    upstream.configure("c2", mode="status:500")
    # rand returns the upper bound: every backoff sleep is the full 30 s.
    async with running_worker(
        pool, backoff_base=30.0, backoff_cap=30.0, rand=lambda lo, hi: hi
    ) as worker:
        await pool.control.claim("c2", upstream.url("c2"))
        state = await wait_state(pool, "c2", "backoff")
        assert "HTTP 500" in state["last_error"]
        assert upstream.stats("c2").connections_total == 1
        await pool.control.cancel("c2")
        # Behaviour, not speed: any deadline short of the 30 s sleep shows the cancel cut it.
        await eventually(lambda: worker.held_sessions() == [], DEADLINE, "reader still sleeping")
        await wait_state(pool, "c2", "stopped")
        assert upstream.stats("c2").connections_total == 1


@pytest.mark.parametrize("mode", ["stall", "vanish"])
async def test_a_silent_upstream_is_detected_by_the_idle_timeout(
    pool: Pool, upstream: SSEUpstream, mode: str
) -> None:
    sid = f"quiet-{mode}"
    idle = 1.0
    async with running_worker(pool, idle_timeout=idle) as worker:
        await pool.control.claim(sid, upstream.url(sid))
        await wait_events(pool, sid, 5)
        # An event written after this moment: the reader read bytes after it, so its idle
        # timer cannot run out before ``since + idle``. (The second event after the count read
        # here: the first may have been written just before and counted just after.)
        since = time.monotonic()
        written = upstream.stats(sid).highest_emitted
        await eventually(lambda: upstream.stats(sid).highest_emitted >= written + 2, DEADLINE)
        upstream.configure(sid, mode=mode)
        # Heartbeats are bytes too: a stalled or vanished stream sends none of them.
        await eventually(lambda: upstream.stats(sid).connections_total >= 2, DEADLINE,
                         f"no reconnect after the stream went silent ({mode})")  # fmt: skip
        reconnects = worker.metrics.registry.get_sample_value(
            "listenerpool_upstream_reconnects_total", {"reason": "idle_timeout"}
        )
        assert reconnects, "the reconnect was not the idle timeout's"
        # Behaviour, not speed: the idle timeout never fires early.
        assert upstream.stats(sid).connections[1].opened - since >= idle
        upstream.reset(sid)
        count = len(await pool.stream(sid))
        await wait_events(pool, sid, count + 5)
        await assert_gapless(pool, sid)
        assert upstream.stats(sid).max_concurrent == 1
        assert upstream.stats(sid).last_event_ids[-1] not in (None, "")


async def test_server_errors_and_refused_connections_back_off_and_keep_trying(
    pool: Pool, upstream: SSEUpstream
) -> None:
    upstream.configure("e500", mode="status:500")
    closed_port = free_port()  # nothing listens there
    delays: list[float] = []

    def record(lo: float, hi: float) -> float:
        delays.append(hi)
        return hi / 2

    async with running_worker(pool, backoff_base=0.05, backoff_cap=0.4, rand=record):
        await pool.control.claim("e500", upstream.url("e500"))
        await pool.control.claim("refused", f"http://127.0.0.1:{closed_port}/events/refused")

        async def retried(sid: str, times: int) -> bool:
            return int((await state_of(pool, sid)).get("retries", 0)) >= times

        await eventually(lambda: retried("e500", 5), 10, "500s were not retried")
        await eventually(lambda: retried("refused", 5), 10, "refused connections not retried")
        assert upstream.stats("e500").connections_total >= 5
        refused = await state_of(pool, "refused")
        assert refused["state"] == "backoff"
        assert "connection failed" in refused["last_error"]
        assert "HTTP 500" in (await state_of(pool, "e500"))["last_error"]
        # Full jitter over an exponential bound, capped: 0.05, 0.1, 0.2, 0.4, 0.4, ...
        assert 0.05 in delays and 0.4 in delays and max(delays) == 0.4
        # The session recovers by itself once the upstream does.
        upstream.reset("e500")
        await wait_state(pool, "e500", "listening")
        await wait_events(pool, "e500", 3)


async def test_404_fails_the_session_with_the_reason(pool: Pool, upstream: SSEUpstream) -> None:
    upstream.configure("gone", mode="status:404")
    async with running_worker(pool) as worker:
        await pool.control.claim("gone", upstream.url("gone"))
        state = await wait_state(pool, "gone", "failed")
        assert "HTTP 404" in state["last_error"]
        await eventually(lambda: worker.held_sessions() == [], DEADLINE, "failed reader still held")
        assert await pool.redis.get("lp:{gone}:lease") is None

        # Its lease index entry goes when it comes due, and nobody restarts the session.
        async def unindexed() -> bool:
            return "gone" not in await pool.indexed("leases")

        # It comes due a TTL after the last renewal; the reconciler wakes at most an interval
        # after that. Several of both: a deadline a loaded machine meets.
        settings = worker.settings
        deadline = 5 * settings.lease_ttl + settings.reconcile_period
        await eventually(unindexed, deadline, "failed session still indexed")
        assert upstream.stats("gone").connections_total == 1


@pytest.mark.parametrize(
    ("mode", "expected_error"),
    [
        ("oversized", "max_event_bytes"),
        ("garbage", "not sending an event stream"),
        ("wrong_type", "not text/event-stream"),
    ],
)
async def test_malformed_streams_are_reported_and_retried(
    pool: Pool, upstream: SSEUpstream, mode: str, expected_error: str
) -> None:
    sid = f"bad-{mode}"
    upstream.configure(sid, mode=mode)
    # The error is in the session state while the reader backs off; the next connection's
    # `listening` clears it. Full jitter can make that wait shorter than the test's 20 ms
    # polls, so here each wait is its bound (1 s, then 2 s).
    async with running_worker(
        pool, rand=lambda low, high: high, max_event_bytes=4096, backoff_base=1.0, backoff_cap=2.0
    ) as worker:
        await pool.control.claim("healthy", upstream.url("healthy"))
        await pool.control.claim(sid, upstream.url(sid))

        async def reported() -> bool:
            state = await state_of(pool, sid)
            return state.get("state") == "backoff" and expected_error in state.get("last_error", "")

        await eventually(reported, 10, f"{mode}: no clear error in the session state")
        await eventually(
            lambda: upstream.stats(sid).connections_total >= 2, DEADLINE, "not retried"
        )
        # The worker and its other readers are unaffected.
        assert sid in worker.held_sessions()
        before = len(await pool.stream("healthy"))
        await wait_events(pool, "healthy", before + 5)
        upstream.reset(sid)
        await wait_state(pool, sid, "listening")


async def test_invalid_utf8_is_replaced_not_fatal(pool: Pool, upstream: SSEUpstream) -> None:
    upstream.configure("latin", mode="invalid_utf8")
    async with running_worker(pool):
        await pool.control.claim("latin", upstream.url("latin"))
        await wait_events(pool, "latin", 5)
        entries = await pool.stream("latin")
        assert all("\ufffd" in e["data"] for e in entries)
        assert [int(e["uid"]) for e in entries] == list(range(1, len(entries) + 1))
        assert (await state_of(pool, "latin"))["state"] == "listening"


def task_names() -> list[str]:
    """The worker's own tasks (all named); the test's helpers run unnamed ones."""
    return sorted(n for t in asyncio.all_tasks() if not (n := t.get_name()).startswith("Task-"))


def _connections_to(port: int) -> int:
    return sum(
        1
        for c in psutil.Process(os.getpid()).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def test_no_task_or_socket_outlives_a_stopped_session(
    pool: Pool, upstream: SSEUpstream
) -> None:
    async with running_worker(pool) as worker:
        baseline = task_names()
        sids = [f"leak{i}" for i in range(20)]
        for sid in sids:
            await pool.control.claim(sid, upstream.url(sid))
        await eventually(lambda: len(worker.held_sessions()) == 20, DEADLINE, "readers not started")
        await eventually(lambda: _connections_to(upstream.port) == 20, DEADLINE, "not connected")
        await eventually(
            lambda: worker.listener_states() == {"listening": 20}, DEADLINE, "not listening"
        )
        # A listener is its connection: a task runs only while it publishes what came in (the
        # upstream sends now and then), so the tasks go back to the worker's own.
        await eventually(lambda: task_names() == baseline, DEADLINE, f"tasks: {task_names()}")
        for sid in sids:
            await pool.control.cancel(sid)
        await eventually(lambda: worker.held_sessions() == [], DEADLINE, "readers still held")
        await eventually(lambda: _connections_to(upstream.port) == 0, DEADLINE, "sockets left open")
        await eventually(lambda: task_names() == baseline, DEADLINE, f"tasks left: {task_names()}")
        await eventually(
            lambda: upstream.total_concurrent() == 0, DEADLINE, "upstream still sees us"
        )
    # Once the worker has stopped, nothing of it is left on the loop.
    assert len(asyncio.all_tasks()) == 1  # this test's own task


async def test_a_missed_cancel_notice_is_caught_by_the_next_renewal(
    pool: Pool, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = worker_module.renew_all
    renewed: list[list[str]] = []  # the sessions of each renewal round, in order

    async def watched(
        redis: Any, scripts: Any, sessions: Any, ttl_ms: int, *rest: Any, **named: Any
    ) -> Any:
        renewed.append([s.sid for s in sessions])
        return await real(redis, scripts, sessions, ttl_ms, *rest, **named)

    monkeypatch.setattr(worker_module, "renew_all", watched)
    async with running_worker(pool):
        await pool.control.claim("missed", upstream.url("missed"))
        await wait_state(pool, "missed", "listening")
        k = SessionKeys("missed")
        # The cancel script alone: tombstone written, no notice published on lp:ctl.
        await pool.control.scripts.cancel(keys=[k.spec, k.cancel, k.lease, k.state], args=[60_000])
        rounds_before = len(renewed)
        await eventually(lambda: len(upstream.stats("missed").disconnects) == 1, DEADLINE,
                         "the renewal did not notice the tombstone")  # fmt: skip
        await wait_state(pool, "missed", "stopped")
        # "Next", counted in rounds rather than seconds: the first round sent after the
        # tombstone sees it and stops the reader before the round after it starts.
        await eventually(lambda: len(renewed) >= rounds_before + 2, DEADLINE, "no renewals")
        assert renewed[rounds_before + 1] == [], "the first round after the cancel missed it"


async def test_a_new_url_for_a_running_session_reconnects_to_it(
    pool: Pool, upstream: SSEUpstream
) -> None:
    async with running_worker(pool):
        await pool.control.claim("moving", upstream.url("moving"))
        await wait_events(pool, "moving", 5)
        result = await pool.control.claim("moving", upstream.url("moved"))
        assert result.outcome.value == "updated"
        await eventually(lambda: upstream.stats("moved").connections_total == 1, DEADLINE,
                         "the reader did not move to the new URL")  # fmt: skip
        await eventually(lambda: upstream.stats("moving").concurrent == 0, DEADLINE,
                         "old stream open")  # fmt: skip
        state = await wait_state(pool, "moving", "listening")
        assert state["epoch"] == "1"  # same lease, same epoch: only the spec changed
        # The resume point carries over: the new stream continues after the last stored id.
        resumed = upstream.stats("moved").last_event_ids[0]
        assert resumed is not None and int(resumed) >= 5


Keys = Sequence[str]
Args = Sequence[str | int]
PublishCall = Callable[[Keys, Args], Awaitable[int]]


def on_fifth_publish(
    worker: Worker, fifth: Callable[[PublishCall, Keys, Args], Awaitable[int]]
) -> None:
    """Have ``fifth`` make the worker's fifth publish call (given the real one), a fault that
    befalls one call after its predecessors went through."""
    real = worker._publisher.call
    calls = 0

    async def publish(keys: Keys, args: Args) -> int:
        nonlocal calls
        calls += 1
        return await (fifth(real, keys, args) if calls == 5 else real(keys, args))

    worker._publisher.call = publish  # type: ignore[method-assign]


async def test_a_publish_re_sent_after_a_lost_reply_is_not_applied_twice(
    pool: Pool, upstream: SSEUpstream
) -> None:
    """The Redis client re-sends a call whose reply a connection error took, though Redis may
    have applied it. The second copy must be refused, and the reader must resume from what
    Redis holds: every upstream event stored once, seq equal to the upstream's numbering."""
    async with running_worker(pool) as worker:

        async def re_sent(publish: PublishCall, keys: Keys, args: Args) -> int:
            await publish(keys, args)
            return await publish(keys, args)  # the re-sent copy's reply wins

        on_fifth_publish(worker, re_sent)
        await pool.control.claim("resent", upstream.url("resent"))
        await eventually(lambda: upstream.stats("resent").connections_total >= 2, 10,
                         "the reader did not reconnect after the refused copy")  # fmt: skip
        await wait_events(pool, "resent", 30)
        stream = await pool.stream("resent")
        numbers = [SSEUpstream.number_of(e["data"]) for e in stream]
        assert numbers == list(range(1, len(numbers) + 1)), "lost or duplicated events"
        assert [int(e["seq"]) for e in stream] == numbers
        state = await state_of(pool, "resent")
        assert state["state"] == "listening"
        assert state["epoch"] == "1", "the reader gave the session up instead of resuming"
        resumed_after = upstream.stats("resent").last_event_ids[1]
        assert resumed_after is not None and int(resumed_after) >= 5, resumed_after


async def test_a_publish_whose_reply_was_lost_is_remembered_for_a_write_back(
    pool: Pool, upstream: SSEUpstream
) -> None:
    """A reader remembers the events it published, for a re-assertion to write back after
    Redis loses its data. One whose reply never came (a connection error, or a reader stopped
    while waiting) was applied all the same: the next connection finds Redis ahead of the
    reader's memory, and must fill the gap from the history, or a write-back would lack it."""
    async with running_worker(pool) as worker:

        async def reply_lost(publish: PublishCall, keys: Keys, args: Args) -> int:
            await publish(keys, args)
            raise redis.exceptions.ConnectionError("the reply was lost")

        on_fifth_publish(worker, reply_lost)
        await pool.control.claim("unreplied", upstream.url("unreplied"))
        await eventually(lambda: upstream.stats("unreplied").connections_total >= 2, DEADLINE,
                         "the reader did not reconnect after the lost reply")  # fmt: skip
        await wait_events(pool, "unreplied", 30)
        running = worker.reader("unreplied")
        assert running is not None
        session = running.session
        remembered = [event.seq for event in session.recent or ()]
        assert remembered == list(range(remembered[0], session.seq + 1)), remembered


async def test_a_stopped_reader_sends_its_fin_before_the_loop_runs_again(
    pool: Pool, upstream: SSEUpstream
) -> None:
    """A fenced reader's lease is about to be another worker's: its upstream socket must be
    shut down when the stop is decided, not once a busy (or just woken) loop gets round to
    the task's cancellation."""
    async with running_worker(pool) as worker:
        await pool.control.claim("sever", upstream.url("sever"))
        await wait_state(pool, "sever", "listening")
        stop = asyncio.create_task(worker.stop_reader("sever", StopReason.FENCED))
        await asyncio.sleep(0)  # the stop's first step, then the loop is held below
        deadline = time.monotonic() + DEADLINE
        # Blocking on purpose: the loop stands for one too busy to run the reader's task.
        while not upstream.stats("sever").disconnects and time.monotonic() < deadline:
            time.sleep(0.005)  # noqa: ASYNC251
        assert upstream.stats("sever").disconnects, "no FIN while the loop was held"
        await stop


@pytest.mark.parametrize("how", ["connection error", "refused"])
async def test_a_state_report_redis_did_not_take_is_sent_again(
    pool: Pool, upstream: SSEUpstream, how: str
) -> None:
    """Readers report on changes only. If Redis cannot take "listening" (a restart just after
    the adoption), or refuses it (the lease not back yet after a data loss, when the
    write-back then records the state from before), the state must not stay stale while the
    reader listens."""
    async with running_worker(pool) as worker:
        real = worker._reporter.call
        failures = 0

        async def fails_once(keys: Sequence[str], args: Sequence[str | int]) -> int:
            nonlocal failures
            if failures == 0 and "listening" in args:
                failures += 1
                if how == "refused":
                    return 0
                raise redis.exceptions.ConnectionError("Redis is restarting")
            return await real(keys, args)

        worker._reporter.call = fails_once  # type: ignore[method-assign]
        await pool.control.claim("unreported", upstream.url("unreported"))
        await eventually(lambda: failures == 1, DEADLINE, "the listening report was never made")
        await wait_state(pool, "unreported", "listening")
        assert upstream.stats("unreported").connections_total == 1


async def test_a_slow_renewal_round_still_confirms_the_leases_it_renewed(
    pool: Pool, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds whose replies come later than a renewal interval but before the fencing point
    (a loaded machine, a busy Redis) keep their readers: cut off at the interval, they would
    confirm nothing and every reader would fence on a lease Redis had in fact renewed."""
    # Rounds go one after the other, so a reply may take up to half the fencing time.
    settings = fast_settings(redis_url=pool.url, lease_ttl=5.0, lease_margin=0.5)
    lag = (settings.renew_interval + settings.fence_after / 2) / 2  # above the interval
    real = worker_module.renew_all
    rounds = 0

    async def slow_renew_all(*args: Any, **kwargs: Any) -> Any:
        nonlocal rounds
        verdicts = await real(*args, **kwargs)
        await asyncio.sleep(lag)  # the reply's delay: Redis has applied the round already
        rounds += 1
        return verdicts

    monkeypatch.setattr(worker_module, "renew_all", slow_renew_all)
    async with running_worker(pool, lease_ttl=5.0, lease_margin=0.5) as worker:
        await pool.control.claim("slow-renew", upstream.url("slow-renew"))
        await wait_state(pool, "slow-renew", "listening")
        await eventually(lambda: rounds >= 3, 20, "fewer than 3 renewal rounds")
        assert worker.metrics.self_fences._value.get() == 0
        assert worker.held_sessions() == ["slow-renew"]
        assert upstream.stats("slow-renew").connections_total == 1


async def test_a_reassertion_slower_than_the_lease_clock_left_still_keeps_the_reader(
    redis_server: RedisServer, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a data loss the renewal round sees "spec gone": nobody holds the lease and no
    reconciler can claim it, so the reader's clock runs on from that round. A re-assertion
    that takes longer than what was left of the clock (a loaded machine, many sessions with
    history to write back) must not fence the reader and drop the session."""
    pool = Pool(redis_server.url)
    real = worker_module.reassert_all
    settings = fast_settings(redis_url=pool.url, lease_ttl=5.0)
    # Longer than a clock confirmed a renewal interval before the loss has left, shorter
    # than a whole clock.
    slow = settings.fence_after - settings.renew_interval / 2

    async def slow_reassert_all(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(slow)  # the write-back's own cost, before it reaches Redis
        return await real(*args, **kwargs)

    monkeypatch.setattr(worker_module, "reassert_all", slow_reassert_all)
    try:
        # Three events, then heartbeats only: the renewal round, not a publish, meets the loss.
        upstream.configure("slow-restore", total=3)
        async with running_worker(pool, lease_ttl=5.0) as worker:
            await pool.control.claim("slow-restore", upstream.url("slow-restore"))
            await wait_state(pool, "slow-restore", "listening")
            await wait_events(pool, "slow-restore", 3)
            redis_server.lose_data()
            await eventually(
                lambda: pool.redis.exists(SessionKeys("slow-restore").spec), 10,
                "the session was not re-asserted",
            )  # fmt: skip
            assert worker.metrics.self_fences._value.get() == 0
            assert worker.held_sessions() == ["slow-restore"]
            assert upstream.stats("slow-restore").max_concurrent == 1
    finally:
        await pool.aclose()


class ClockRunsOutOnRead:
    """The worker's Redis client, whose first ``hmget`` (the reader's read of its resume
    point) returns only after the lease clock ran out: as when the process froze while the
    reply was on its way and its loop, woken, runs that ready reply before the fence timer."""

    def __init__(self, redis: Any, now: list[float], to: float) -> None:
        self._redis = redis
        self._now = now
        self._to = to
        self.read = asyncio.Event()

    async def hmget(self, *args: Any) -> Any:
        reply = await self._redis.hmget(*args)
        if not self.read.is_set():
            self._now[0] = self._to
            self.read.set()
        return reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)


async def test_a_reader_whose_lease_clock_ran_out_opens_no_connection(
    pool: Pool, upstream: SSEUpstream
) -> None:
    """A lease that lapsed is the next owner's: the reader whose renewals were not confirmed
    in time must not connect, even before the fence loop gets to stop it. Once a renewal
    confirms the lease again, it connects."""
    sid = "ran-out"
    claimed = await pool.control.claim(sid, upstream.url(sid))
    settings = pool.settings
    now = [1000.0]
    clock = LeaseClock(confirmed_at=now[0], fence_after=settings.fence_after)
    session = HeldSession(
        SessionKeys(sid), "t", claimed.epoch, "w:t", UpstreamSpec(upstream.url(sid)), clock
    )
    redis = ClockRunsOutOnRead(pool.redis, now, to=now[0] + settings.fence_after)
    metrics = WorkerMetrics()
    scripts = pool.control.scripts
    reporter = Publisher(pool.redis, scripts, script=scripts.report)
    reporting = asyncio.create_task(reporter.run())
    reader = Reader(
        session,
        redis=redis,
        scripts=scripts,
        publisher=Publisher(pool.redis, scripts),
        reporter=reporter,
        upstream=UpstreamClient.from_settings(settings),
        settings=settings,
        metrics=metrics,
        rand=lambda low, high: 0.05,
        clock=lambda: now[0],
    )
    task = asyncio.create_task(reader.run())
    try:
        refused = metrics.reconnects[ReconnectReason.LEASE_UNCONFIRMED]
        await eventually(
            lambda: refused._value.get() >= 2 or upstream.stats(sid).connections_total > 0,
            DEADLINE,
            "no attempt to connect",
        )
        assert upstream.stats(sid).connections_total == 0, "connected on a run-out lease"
        clock.confirm(now[0])  # a renewal round confirms the lease again
        await eventually(
            lambda: upstream.stats(sid).connections_total == 1, DEADLINE, "never connected"
        )
    finally:
        await cancel_until_done(task)
        await cancel_until_done(reporting)
