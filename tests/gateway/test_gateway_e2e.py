"""The gateway end to end: real ``python -m gateway`` and ``python -m workers`` processes, a real
redis-server and the scripted upstream, all on loopback.

Every test judges from outside, as a client would: the seq numbers and upstream event numbers each
WebSocket or SSE client received, HTTP statuses and JSON error bodies, what the upstream saw, what
Redis reports (``CLIENT LIST``) and the gateway process's resident memory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import struct
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import psutil
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from listenerpool.connections import MAX_REDIS_CONNECTIONS
from listenerpool.sse import SSEParser
from listenerpool.tasks import cancel_until_done
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import BACKENDS, GatewayProcesses, Pool, WorkerProcesses, eventually
from tests.gateway.rawws import RawWebSocket
from tests.tasks import finish_tasks, task_stack

TOO_SLOW = 1013
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


# -- clients -----------------------------------------------------------------------------------
def events_url(base: str, sid: str, after: int | None = None, *, ws: bool = False) -> str:
    url = f"{base}/v1/sessions/{quote(sid, safe='')}/events"
    if ws:
        url = "ws://" + url.removeprefix("http://")
    return url if after is None else f"{url}?after={after}"


def open_ws(url: str, **kwargs: Any) -> Any:
    """A WebSocket client without compression or proxies (both only cost CPU here)."""
    options: dict[str, Any] = {
        "compression": None,
        "proxy": None,
        "max_size": None,
        "open_timeout": 10,
        "close_timeout": 2,
        "ping_interval": None,
    }
    return ws_connect(url, **{**options, **kwargs})


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=HTTP_TIMEOUT, trust_env=False, limits=httpx.Limits(max_connections=None)
    )


@dataclass
class Received:
    """What one client saw: event seqs and upstream event numbers in arrival order, notices
    (frames without a seq), and why each connection before the last one ended."""

    kind: str
    after: int
    until: int = 0
    where: str = ""
    seqs: list[int] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    notices: list[Any] = field(default_factory=list)
    ends: list[str] = field(default_factory=list)
    connects: int = 0
    finished: bool = False

    @property
    def last(self) -> int:
        return self.seqs[-1] if self.seqs else self.after

    def add(self, seq: int, data: str) -> None:
        self.seqs.append(seq)
        self.numbers.append(SSEUpstream.number_of(data))

    def summary(self) -> str:
        return (
            f"{self.kind}@{self.where} after={self.after} until={self.until} last={self.last} "
            f"got={len(self.seqs)} connects={self.connects} ends={self.ends}"
        )

    def assert_consecutive(self, until: int | None = None) -> None:
        """seq ``after+1, after+2, ...`` with no gap or duplicate, each carrying upstream event
        number == seq (a fresh session numbers both from 1), and no reset notice."""
        assert not self.notices, f"{self.kind} client got notices: {self.notices[:3]}"
        expected = list(range(self.after + 1, self.after + 1 + len(self.seqs)))
        if self.seqs != expected:
            raise AssertionError(f"{self.summary()}: {describe_gaps(self.seqs)}")
        assert self.numbers == self.seqs, f"{self.kind}: upstream numbers differ from seqs"
        if until is not None:
            assert self.last == until, f"{self.kind}: stopped at {self.last}, wanted {until}"


def describe_gaps(seqs: list[int]) -> str:
    dups = [s for s, n in Counter(seqs).items() if n > 1]
    breaks = [(a, b) for a, b in itertools.pairwise(seqs) if b != a + 1]
    return f"{len(seqs)} seqs, first {seqs[:1]}, duplicates {dups[:5]}, breaks {breaks[:5]}"


async def ws_read(url: str, rec: Received, until: int) -> str | None:
    """Read event frames into ``rec`` until seq ``until``; None then, else why it ended."""
    try:
        async with open_ws(url) as conn:
            rec.connects += 1
            async for text in conn:
                obj = json.loads(text)
                if "seq" not in obj:
                    rec.notices.append(obj)
                    continue
                rec.add(int(obj["seq"]), obj["data"])
                if obj["seq"] >= until:
                    return None
            return f"ws closed {conn.close_code}"
    except ConnectionClosed as exc:
        return f"ws closed {exc.rcvd.code if exc.rcvd else None}"


async def sse_read(
    client: httpx.AsyncClient,
    url: str,
    rec: Received,
    until: int,
    last_event_id: int,
    *,
    by_query: bool = False,
) -> str | None:
    """Read an SSE response into ``rec`` until seq ``until``, resuming after ``last_event_id``
    (``Last-Event-ID`` header, or ``?after=`` with ``by_query``); None then, else why it
    ended."""
    headers = {}
    if by_query:
        url = f"{url}?after={last_event_id}"
    elif last_event_id:
        headers["Last-Event-ID"] = str(last_event_id)
    try:
        async with client.stream("GET", url, headers=headers) as resp:
            rec.connects += 1
            if resp.status_code != 200:
                body = (await resp.aread())[:300]
                raise AssertionError(f"SSE answered {resp.status_code}: {body!r}")
            assert resp.headers["content-type"].startswith("text/event-stream")
            parser = SSEParser()
            async for chunk in resp.aiter_raw():
                for event in parser.feed(chunk):
                    if event.type == "lp-reset":
                        rec.notices.append(json.loads(event.data))
                        continue
                    seq = int(event.id)
                    rec.add(seq, event.data)
                    if seq >= until:
                        return None
    except httpx.TransportError as exc:
        return f"sse error {exc!r}"
    return "sse ended"


async def follow(
    kind: str,
    base: str,
    sid: str,
    until: int,
    *,
    after: int = 0,
    max_connects: int = 1,
    rec: Received | None = None,
) -> Received:
    """A client following ``sid`` from ``after`` to seq ``until``: ``kind`` "ws", "sse" (resumes
    with ``Last-Event-ID``) or "sse-q" (with ``?after=``). When the gateway ends the connection
    (a client too slow is cut off), it resumes from its last seq, as documented, at most
    ``max_connects`` connections in all. Progress is kept in ``rec`` (for diagnostics)."""
    if rec is None:
        rec = Received(kind, after)
    rec.kind, rec.after, rec.until, rec.where = kind, after, until, base.rsplit(":", 1)[-1]
    async with http_client() as client:
        for _ in range(max_connects):
            if kind == "ws":
                reason = await ws_read(events_url(base, sid, rec.last, ws=True), rec, until)
            else:
                url = events_url(base, sid)
                by_query = kind == "sse-q"
                reason = await sse_read(client, url, rec, until, rec.last, by_query=by_query)
            if reason is None:
                rec.finished = True
                return rec
            rec.ends.append(reason)
    raise AssertionError(f"{rec.summary()}: ended {max_connects} times")


async def run_clients(
    jobs: list[Coroutine[Any, Any, Any]], recs: list[Received], timeout: float
) -> None:
    """Run client coroutines to completion; on a failure or at the deadline, cancel the rest
    and fail with where every unfinished client stands."""
    tasks = [asyncio.create_task(job) for job in jobs]
    stacks = ""
    try:
        done, pending = await asyncio.wait(
            tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
        )
        if pending:
            stacks = "\n".join(task_stack(t) for t in list(pending)[:3])
    finally:
        stuck = await finish_tasks(set(tasks), time.monotonic() + 10)
        assert not stuck, (
            f"{len(stuck)} client tasks ignore cancellation: {task_stack(stuck.pop())}"
        )
    errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    if pending or errors:
        unfinished = "\n  ".join(rec.summary() for rec in recs if not rec.finished)
        raise AssertionError(
            f"{len(pending)} clients unfinished after {timeout}s, errors {errors[:3]}; "
            f"unfinished:\n  {unfinished}\nstacks:\n{stacks}"
        )


def ws_and_sse_on_each(
    bases: list[str], sid: str, until: int
) -> tuple[list[Received], list[Coroutine[Any, Any, Any]]]:
    """A WebSocket and an SSE client from seq 0 on each gateway (not started yet)."""
    received, jobs = [], []
    for base in bases:
        for kind in ("ws", "sse"):
            rec = Received(kind, 0)
            received.append(rec)
            jobs.append(follow(kind, base, sid, until, rec=rec))
    return received, jobs


# -- processes ---------------------------------------------------------------------------------
async def start_gateways(
    processes: GatewayProcesses, redis_url: str, count: int, **settings: Any
) -> list[str]:
    """Start ``count`` gateways side by side; their base URLs once each answers /healthz."""
    started = await asyncio.gather(
        *(asyncio.to_thread(processes.start, redis_url, f"gw{i}", **settings) for i in range(count))
    )
    return [base for _, base in started]


def start_workers(processes: WorkerProcesses, redis_url: str, count: int, **settings: Any) -> None:
    for i in range(count):
        processes.start(redis_url, f"w{i}", **settings)


def rss(proc: Any) -> int:
    return int(psutil.Process(proc.pid).memory_info().rss)


async def put_session(client: httpx.AsyncClient, base: str, sid: str, url: str) -> httpx.Response:
    return await client.put(f"{base}/v1/sessions/{sid}", json={"url": url})


async def head_seq(pool: Pool, sid: str) -> int:
    value = await pool.redis.hget(f"lp:{{{sid}}}:state", "seq")
    return int(value or 0)


async def wait_head(pool: Pool, sid: str, at_least: int, timeout: float) -> None:
    async def reached() -> bool:
        return await head_seq(pool, sid) >= at_least

    await eventually(reached, timeout, f"{sid}: the stream never reached seq {at_least}")


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> None:
    assert resp.status_code == status, f"{resp.status_code}: {resp.text[:300]}"
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"].get("message"), str) and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body


@pytest.fixture
def burst_upstream() -> Iterator[SSEUpstream]:
    """Sessions emit as fast as the socket takes events; each test sets ``total``."""
    with SSEUpstream(rate=0, heartbeat=0.5) as server:
        yield server


# -- 1. fan-out ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@BACKENDS
async def test_every_client_on_every_gateway_gets_all_10000_events_in_order(
    redis_url: str,
    burst_upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    total = 10_000
    sid = "fanout"
    burst_upstream.configure(sid, total=total)
    start_workers(worker_processes, redis_url, 2)
    # Queues big enough for the whole burst: this test is about fan-out, not slow clients.
    bases = await start_gateways(
        gateway_processes, redis_url, 2, client_queue=2 * total, client_queue_bytes=64 << 20
    )
    async with http_client() as client:
        resp = await put_session(client, bases[0], sid, burst_upstream.url(sid))
        assert resp.status_code == 201, resp.text
        received, jobs = ws_and_sse_on_each(bases, sid, total)
        await run_clients(jobs, received, 45)

    for rec in received:
        rec.assert_consecutive(until=total)
        assert rec.connects == 1
    assert all(rec.seqs == received[0].seqs for rec in received)
    assert received[0].numbers == list(range(1, total + 1))
    stats = burst_upstream.stats(sid)
    assert stats.connections_total == 1 and stats.highest_emitted == total


# -- 2. reconnect --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["ws", "sse"])
@BACKENDS
async def test_a_reconnecting_client_gets_exactly_the_missed_events_then_live(
    kind: str,
    redis_url: str,
    pool: Pool,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    sid = f"resume-{kind}"
    upstream.configure(sid, rate=200)
    start_workers(worker_processes, redis_url, 1)
    [base] = await start_gateways(gateway_processes, redis_url, 1)
    async with http_client() as client:
        assert (await put_session(client, base, sid, upstream.url(sid))).status_code == 201

        first = Received(kind, 0)
        if kind == "ws":
            assert await ws_read(events_url(base, sid, ws=True), first, 100) is None
        else:
            assert await sse_read(client, events_url(base, sid), first, 100, 0) is None
        first.assert_consecutive(until=100)

        # Away long enough to miss events, then resume: WS by ?after=, SSE by Last-Event-ID.
        await wait_head(pool, sid, first.last + 100, 10)
        head = await head_seq(pool, sid)
        again = Received(kind, first.last)
        until = head + 100  # past what the history held at the reconnect: served live
        if kind == "ws":
            url = events_url(base, sid, first.last, ws=True)
            assert await ws_read(url, again, until) is None
        else:
            url = events_url(base, sid)
            assert await sse_read(client, url, again, until, first.last) is None
        again.assert_consecutive(until=until)
        assert again.seqs[0] == 101


# -- 3. join race --------------------------------------------------------------------------------
class HeadWatcher:
    """Polls a session's top seq in Redis so many tasks can wait on it without polling."""

    def __init__(self, pool: Pool, sid: str) -> None:
        self.pool = pool
        self.sid = sid
        self.head = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HeadWatcher:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        # One cancel is not enough: the Redis call can absorb it (see tests/teardown.py).
        await cancel_until_done(self._task)

    async def _poll(self) -> None:
        while True:
            self.head = await head_seq(self.pool, self.sid)
            await asyncio.sleep(0.005)

    async def reached(self, seq: int, timeout: float) -> None:
        await eventually(lambda: self.head >= seq, timeout, f"stream never reached seq {seq}")


@pytest.mark.timeout(120)
async def test_50_clients_joining_at_random_moments_each_see_a_gap_free_sequence(
    redis_url: str,
    pool: Pool,
    burst_upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    total, clients, window = 12_000, 50, 1500
    sid = "joinrace"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    burst_upstream.configure(sid, total=total)
    # History long enough that no late joiner from after=0 meets a trimmed stream (reset).
    start_workers(worker_processes, redis_url, 2, history_maxlen=2 * total)
    bases = await start_gateways(gateway_processes, redis_url, 2)
    plans = [
        # (kind, gateway, join when the stream passes this seq, after=0 or a recent seq)
        (
            ("ws", "sse", "ws", "sse-q")[i % 4],
            bases[(i // 4) % 2],
            rng.randint(0, total - 2000),
            i % 3 == 0,
        )
        for i in range(clients)
    ]

    received = [Received(kind, -1) for kind, *_ in plans]

    async def join(rec: Received, base: str, join_at: int, from_start: bool) -> None:
        await watcher.reached(join_at, 30)
        await asyncio.sleep(rng.uniform(0, 0.02))  # jitter, not synchronisation
        head = watcher.head
        # Read across the history/live boundary: past the head seen at the join.
        until = min(total, head + window)
        # At least one event left to read, even for a client joining at the very end.
        after = 0 if from_start else rng.randint(max(0, head - 300), min(head, until - 1))
        await follow(rec.kind, base, sid, until, after=after, max_connects=20, rec=rec)

    async with http_client() as client, HeadWatcher(pool, sid) as watcher:
        assert (
            await put_session(client, bases[1], sid, burst_upstream.url(sid))
        ).status_code == 201
        jobs = [join(rec, *plan[1:]) for rec, plan in zip(received, plans, strict=True)]
        try:
            await run_clients(jobs, received, 60)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from None

    for rec, plan in zip(received, plans, strict=True):
        try:
            rec.assert_consecutive()
            assert rec.seqs, "no events"
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}, client {plan}: {exc}") from None
    assert sum(rec.after == 0 for rec in received) >= clients // 3
    assert all(rec.seqs[0] == 1 for rec in received if rec.after == 0)


# -- 4. pub/sub connections killed -------------------------------------------------------------
async def live_subscribers(pool: Pool, sid: str) -> int:
    [_, count] = await pool.redis.execute_command("PUBSUB", "SHARDNUMSUB", f"lp:{{{sid}}}:live")
    return int(count)


async def wait_subscribers(pool: Pool, sid: str, count: int, timeout: float) -> None:
    async def subscribed() -> bool:
        return await live_subscribers(pool, sid) == count

    await eventually(subscribed, timeout, f"{sid}: live channel never had {count} subscribers")


@pytest.mark.timeout(90)
async def test_clients_see_no_gap_when_redis_kills_the_pubsub_connections(
    redis_server: RedisServer,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    total, last_kill = 3000, 2970
    sid = "pubsubkill"
    pool = Pool(redis_server.url)
    try:
        # The stream holds at the last kill's seq until the test lets the rest go, so the last
        # events come just after that kill however long the test took to get there.
        with SSEUpstream(rate=500, total=last_kill, heartbeat=0.5) as upstream:
            start_workers(worker_processes, redis_server.url, 1)
            # Only the hub's own reconnect may fill the gaps, not the periodic stream check.
            bases = await start_gateways(
                gateway_processes, redis_server.url, 2, stream_check_interval=600
            )
            async with http_client() as client:
                resp = await put_session(client, bases[0], sid, upstream.url(sid))
                assert resp.status_code == 201
            received, jobs = ws_and_sse_on_each(bases, sid, total)
            clients = asyncio.create_task(run_clients(jobs, received, 40))
            # Mid-stream twice, then just before the end: the events published while the hubs
            # reconnect are followed by silence, so no later live message reveals the gap.
            try:
                for at in (800, 1600, last_kill):
                    await wait_subscribers(pool, sid, 2, 10)
                    await wait_head(pool, sid, at, 20)
                    killed = await pool.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                    assert int(killed) >= 2
                upstream.configure(sid, total=total)
            except BaseException:
                await cancel_until_done(clients)
                raise
            await clients
            for rec in received:
                rec.assert_consecutive(until=total)
                assert rec.connects == 1, rec.ends
    finally:
        await pool.aclose()


# -- 5. a client that stops reading ----------------------------------------------------------------
def established(proc: Any, client_port: int) -> bool:
    """Whether the gateway process still holds an open connection from ``client_port``."""
    return any(
        c.raddr and c.raddr.port == client_port and c.status == psutil.CONN_ESTABLISHED
        for c in psutil.Process(proc.pid).net_connections("tcp")
    )


@pytest.mark.timeout(90)
async def test_a_client_that_stops_reading_is_cut_off_while_another_gets_every_event(
    redis_url: str,
    pool: Pool,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    rate, total = 400, 3000  # 4 KB events: 1.6 MB/s for 7.5 s
    sid = "slowclient"
    with SSEUpstream(rate=rate, total=total, payload_bytes=4000, heartbeat=0.5) as upstream:
        start_workers(worker_processes, redis_url, 1)
        [base] = await start_gateways(
            gateway_processes,
            redis_url,
            1,
            client_queue=64,
            client_queue_bytes=65536,
            client_heartbeat=2,
        )
        gateway = gateway_processes.procs[-1]
        # Both clients join before the first event, so everything reaches them live.
        upstream.configure(sid, mode="stall")
        async with http_client() as client:
            assert (await put_session(client, base, sid, upstream.url(sid))).status_code == 201
        await eventually(lambda: upstream.stats(sid).concurrent == 1, 15, "no reader")
        rss_before = rss(gateway)

        slow = await RawWebSocket.connect(base, f"/v1/sessions/{sid}/events")
        fast = Received("ws", 0)
        # The fast client resumes if cut off, so the run goes on; it must not be (see below).
        fast_task = asyncio.create_task(
            run_clients([follow("ws", base, sid, total, rec=fast, max_connects=200)], [fast], 40)
        )
        try:
            await eventually(lambda: established(gateway, slow.local_port), 10, "slow not in")
            await wait_subscribers(pool, sid, 1, 10)
            await eventually(lambda: fast.connects == 1, 10, "fast client never connected")
            upstream.configure(sid, mode="normal")
            first = await slow.frame()
            assert first is not None and json.loads(first[1])["seq"] == 1
            # ... and the slow client reads nothing more until the stream is over.
            await eventually(lambda: fast.finished, 30, f"fast client stuck: {fast.summary()}")
            await fast_task
        finally:
            await cancel_until_done(fast_task)

        # The slow client was cut off mid-stream and, reading nothing, had its connection
        # dropped by the gateway once the grace (one heartbeat here) had passed.
        await eventually(
            lambda: not established(gateway, slow.local_port), 10, "slow client still held"
        )
        # What it can still read is a gap-free prefix of the stream, then at most the 1013
        # close frame (a reset may discard what was in flight).
        seqs, closes = [1], []
        while (item := await slow.frame()) is not None:
            opcode, payload = item
            if opcode == 0x1:
                seqs.append(json.loads(payload)["seq"])
            elif opcode == 0x8:
                closes.append(struct.unpack(">H", payload[:2])[0])
        slow.close()
        problems = []
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"slow client: {describe_gaps(seqs)}")
        if seqs[-1] >= total:
            problems.append("the slow client was never cut off")
        if closes and closes != [TOO_SLOW]:
            problems.append(f"slow client: close frames {closes}, wanted [1013]")
        growth = rss(gateway) - rss_before
        if growth >= 50 << 20:
            problems.append(f"gateway RSS grew by {growth >> 20} MiB")
        # The fast client got everything, in order, on one connection: reading all the time,
        # it must never be cut off as too slow. (How fast it gets them beside a stalled client
        # is a measure for a bench, not a test.)
        try:
            fast.assert_consecutive(until=total)
        except AssertionError as exc:
            problems.append(f"fast client: {exc}")
        if fast.connects != 1:
            problems.append(f"a client keeping up was cut off: {fast.summary()}")
        assert not problems, "\n".join(problems)


# -- 6. concurrent PUTs, DELETE elsewhere --------------------------------------------------------
@pytest.mark.timeout(60)
@BACKENDS
async def test_concurrent_puts_on_two_gateways_start_one_reader_and_a_delete_anywhere_stops_it(
    redis_url: str,
    pool: Pool,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    sid = "racing-puts"
    start_workers(worker_processes, redis_url, 2)
    bases = await start_gateways(gateway_processes, redis_url, 2)
    url = upstream.url(sid)
    async with http_client() as client:
        targets = [bases[i % 2] for i in range(20)]
        responses = await asyncio.gather(*(put_session(client, b, sid, url) for b in targets))
        assert Counter(r.status_code for r in responses) == {201: 1, 200: 19}, [
            r.text for r in responses
        ]
        assert Counter(r.json()["outcome"] for r in responses) == {"created": 1, "unchanged": 19}
        creator = targets[next(i for i, r in enumerate(responses) if r.status_code == 201)]
        other = next(b for b in bases if b != creator)

        async def listening() -> bool:
            resp = await client.get(f"{other}/v1/sessions/{sid}")
            return resp.status_code == 200 and resp.json()["state"] == "listening"

        await eventually(listening, 15, "the session never started listening")
        # A lease TTL's worth of events: a second reader would have shown up by now.
        await wait_head(pool, sid, 125, 15)
        stats = upstream.stats(sid)
        assert (stats.connections_total, stats.max_concurrent, stats.concurrent) == (1, 1, 1)

        resp = await client.delete(f"{other}/v1/sessions/{sid}")
        assert resp.status_code == 202, resp.text
        await eventually(lambda: upstream.stats(sid).concurrent == 0, 10, "reader still on")
        assert upstream.stats(sid).disconnects, "the reader did not close its connection"

        async def stopped() -> bool:
            states = [(await client.get(f"{b}/v1/sessions/{sid}")).json()["state"] for b in bases]
            return states == ["stopped", "stopped"]

        await eventually(stopped, 10, "GET does not show the session stopped")
        assert upstream.stats(sid).connections_total == 1


# -- 7. one pub/sub connection per gateway ---------------------------------------------------------
@pytest.mark.timeout(150)
async def test_1000_sessions_with_a_client_each_share_one_pubsub_connection(
    redis_server: RedisServer,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    count, workers = 1000, 1
    sids = [f"many{i}" for i in range(count)]
    pool = Pool(redis_server.url)
    stop = asyncio.Event()
    try:
        with SSEUpstream(rate=0.5, heartbeat=0.5) as upstream:
            start_workers(worker_processes, redis_server.url, workers)
            # 1000 PUTs as fast as they go: the control API's rate limit is off here.
            [base] = await start_gateways(gateway_processes, redis_server.url, 1, api_rate=0)
            gateway = gateway_processes.procs[-1]
            limit = asyncio.Semaphore(50)

            async def put(client: httpx.AsyncClient, sid: str) -> int:
                async with limit:
                    return (await put_session(client, base, sid, upstream.url(sid))).status_code

            async with http_client() as client:
                statuses = await asyncio.gather(*(put(client, sid) for sid in sids))
            assert Counter(statuses) == {201: count}

            got_one = [asyncio.Event() for _ in sids]

            async def watch(sid: str, event: asyncio.Event) -> None:
                async with limit:
                    ws = await open_ws(events_url(base, sid, ws=True))
                try:
                    async for text in ws:
                        if json.loads(text).get("seq"):
                            event.set()
                            break
                    await stop.wait()
                finally:
                    await ws.close()

            watchers = [
                asyncio.create_task(watch(sid, e)) for sid, e in zip(sids, got_one, strict=True)
            ]
            try:
                try:
                    await eventually(
                        lambda: all(e.is_set() for e in got_one) or any(w.done() for w in watchers),
                        60,
                    )
                except AssertionError:
                    states = Counter(s.get("state") for s in (await pool.states(sids)).values())
                    raise AssertionError(
                        f"{sum(e.is_set() for e in got_one)} clients got an event; session "
                        f"states {states}; upstream saw {len(upstream.sessions())} sessions; "
                        f"worker log: {worker_processes.log('w0')[-1500:]}"
                    ) from None
                assert all(e.is_set() for e in got_one), [w for w in watchers if w.done()][:1]

                clients = await pool.redis.client_list()
                pubsub = [c for c in clients if int(c["ssub"]) + int(c["sub"]) > 0]
                big = [c for c in pubsub if int(c["ssub"]) >= count]
                assert len(big) == 1, [(c["addr"], c["ssub"]) for c in pubsub]
                assert int(big[0]["ssub"]) == count
                # Besides it, only the workers' control-channel subscriptions.
                assert len(pubsub) == 1 + workers, [(c["addr"], c["ssub"]) for c in pubsub]
                # And the gateway holds a bounded pool of Redis connections, not one per client.
                to_redis = [
                    c
                    for c in psutil.Process(gateway.pid).net_connections("tcp")
                    if c.raddr and c.raddr.port == redis_server.port
                ]
                # (the asyncio pool, plus rq's blocking client on at most 32 executor threads)
                assert len(to_redis) <= MAX_REDIS_CONNECTIONS + 32, len(to_redis)
                hub_id = big[0]["id"]
            finally:
                stop.set()
                await asyncio.gather(*watchers, return_exceptions=True)

            # The last client of each session gone: the hub unsubscribes, on the same connection.
            async def unsubscribed() -> bool:
                hub = [c for c in await pool.redis.client_list() if c["id"] == hub_id]
                return len(hub) == 1 and int(hub[0]["ssub"]) == 0

            await eventually(unsubscribed, 15, "channels still subscribed without clients")
    finally:
        await pool.aclose()


# -- 8. Redis down --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
async def test_redis_down_gives_503_and_the_gateway_recovers_by_itself(
    redis_server: RedisServer,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    start_workers(worker_processes, redis_server.url, 1)
    [base] = await start_gateways(gateway_processes, redis_server.url, 1)
    async with http_client() as client:
        assert (await client.get(f"{base}/readyz")).status_code == 200

        redis_server.kill()
        # Behaviour, not speed: the gateway's Redis client gives up after 2 retries of at most
        # 1 s each, so a 503 does not wait for Redis. A call may take 5 times those retries.
        budget = 5 * 2 * 1.0
        started = time.monotonic()
        assert_error(await client.get(f"{base}/readyz"), 503, "redis_unavailable")
        assert time.monotonic() - started < budget, "/readyz waited for Redis"
        started = time.monotonic()
        resp = await put_session(client, base, "during-outage", upstream.url("during-outage"))
        assert_error(resp, 503, "redis_unavailable")
        assert time.monotonic() - started < budget, "the PUT waited for Redis"
        assert (await client.get(f"{base}/healthz")).status_code == 200

        redis_server.start()

        async def ready() -> bool:
            return (await client.get(f"{base}/readyz")).status_code == 200

        await eventually(ready, 15, "/readyz did not recover by itself")
        sid = "after-outage"
        resp = await put_session(client, base, sid, upstream.url(sid))
        assert resp.status_code == 201, resp.text
        rec = await asyncio.wait_for(follow("ws", base, sid, 10), 20)
        rec.assert_consecutive(until=10)


# -- 9. validation and errors -------------------------------------------------------------------
@pytest.mark.timeout(30)
@BACKENDS
async def test_bad_requests_get_json_errors_with_the_right_status(
    redis_url: str, gateway_processes: GatewayProcesses
) -> None:
    [base] = await start_gateways(gateway_processes, redis_url, 1)
    url = "http://127.0.0.1:9/events/x"
    async with http_client() as client:
        for bad in ("bad%20id", "a" * 129, "semi%3Bcolon", "%C3%A9t%C3%A9", "brace%7Bx%7D"):
            assert_error(
                await client.put(f"{base}/v1/sessions/{bad}", json={"url": url}),
                400,
                "invalid_session_id",
            )
            assert_error(await client.get(f"{base}/v1/sessions/{bad}"), 400, "invalid_session_id")
        for bad_url in ("ftp://example.com/x", "not a url", "http://", "http://h:0/x", ""):
            resp = await client.put(f"{base}/v1/sessions/ok", json={"url": bad_url})
            assert_error(resp, 400, "invalid_upstream")
        resp = await client.put(
            f"{base}/v1/sessions/ok", json={"url": url, "headers": {"Last-Event-ID": "1"}}
        )
        assert_error(resp, 400, "invalid_upstream")
        assert_error(await client.put(f"{base}/v1/sessions/ok", content=b"{"), 400)
        assert_error(await client.put(f"{base}/v1/sessions/ok", json={"headers": {}}), 400)

        big = {"url": url, "headers": {"X-Pad": "a" * (65 * 1024)}}
        assert_error(await client.put(f"{base}/v1/sessions/ok", json=big), 413)

        for method in ("GET", "DELETE"):
            resp = await client.request(method, f"{base}/v1/sessions/nosuch")
            assert_error(resp, 404, "unknown_session")
        assert_error(await client.get(events_url(base, "nosuch")), 404, "unknown_session")
        assert_error(await client.get(f"{base}/v1/nothing-here"), 404)
        assert_error(await client.post(f"{base}/v1/sessions/x"), 405)

        spec = await client.get(f"{base}/v1/openapi.json")
        assert spec.status_code == 200
        paths = spec.json()["paths"]
        assert {"/v1/sessions/{sid}", "/v1/sessions", "/v1/sessions/{sid}/events"} <= set(paths)
        assert {"put", "get", "delete"} <= set(paths["/v1/sessions/{sid}"])

    for sid, code in (("nosuch", 4404), ("bad%20id", 4400)):
        try:
            async with open_ws(events_url(base, sid, ws=True)) as ws:
                await ws.recv()
        except ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == code, exc
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise AssertionError(f"WS to {sid!r}: handshake refused with HTTP {status}") from None
        else:
            raise AssertionError(f"WS to {sid!r} was not closed")

    # A body sent without Content-Length (chunked) is held to the same limit while it streams.
    async def chunks() -> Any:
        for _ in range(20):
            yield b" " * 4096

    async with http_client() as client:
        resp = await client.put(f"{base}/v1/sessions/ok", content=chunks())
        assert_error(resp, 413)
        assert (await client.get(f"{base}/v1/sessions/ok")).status_code == 404, "413 stored it"
