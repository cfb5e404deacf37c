"""listenerpool.client against a real gateway process, worker process and redis-server, plus
the stream's protocol edge cases against a scripted WebSocket server."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve

from listenerpool.client import Event, PoolClient, PoolClientError, Reset
from listenerpool.tasks import cancel_until_done
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import ROOT, GatewayProcesses, Pool, WorkerProcesses, eventually

BIN = Path(sys.executable).parent


@pytest.fixture
def gateway(
    redis_url: str, gateway_processes: GatewayProcesses, worker_processes: WorkerProcesses
) -> tuple[subprocess.Popen[bytes], str]:
    """One worker process and one gateway process on the test's Redis."""
    worker_processes.start(redis_url, "w1")
    return gateway_processes.start(redis_url, "gw1")


@pytest.fixture
async def client(gateway: tuple[subprocess.Popen[bytes], str]) -> AsyncIterator[PoolClient]:
    async with PoolClient(gateway[1]) as c:
        yield c


async def listening(client: PoolClient, sid: str) -> None:
    async def check() -> bool:
        return bool((await client.status(sid))["state"] == "listening")

    await eventually(check, 20, f"{sid} is not listening")


async def take(client: PoolClient, sid: str, n: int, **kwargs: int) -> list[Event | Reset]:
    items: list[Event | Reset] = []
    async with asyncio.timeout(20):
        async for item in client.events(sid, **kwargs):
            items.append(item)
            if len(items) == n:
                break
    return items


def assert_numbered(items: list[Event | Reset], first: int) -> None:
    """Events ``first, first+1, ...`` with the upstream's payloads, no reset, no duplicate."""
    assert all(isinstance(i, Event) for i in items), items
    events = [i for i in items if isinstance(i, Event)]
    assert [e.seq for e in events] == list(range(first, first + len(events)))
    assert [SSEUpstream.number_of(e.data) for e in events] == [e.seq for e in events]
    assert [e.event for e in events] == [SSEUpstream.event_type(e.seq) for e in events]
    assert all(e.id == str(e.seq) and e.epoch >= 1 for e in events)


async def live_subscribers(pool: Pool, sid: str) -> int:
    """Subscribers of the session's live channel: 1 while the gateway has a client for it."""
    [_, count] = await pool.redis.execute_command("PUBSUB", "SHARDNUMSUB", f"lp:{{{sid}}}:live")
    return int(count)


@pytest.mark.timeout(60)
async def test_start_status_events_and_resume(client: PoolClient, upstream: SSEUpstream) -> None:
    started = await client.start("s1", upstream.url("s1"))
    assert started == {"sid": "s1", "outcome": "created", "epoch": started["epoch"]}
    assert (await client.start("s1", upstream.url("s1")))["outcome"] == "unchanged"
    await listening(client, "s1")
    status = await client.status("s1")
    assert status["owner"] == "w1" and status["url"] == upstream.url("s1")

    assert_numbered(await take(client, "s1", 30), first=1)
    assert_numbered(await take(client, "s1", 10, after=25), first=26)

    page = await client.sessions(offset=0, limit=10)
    assert [s["sid"] for s in page["sessions"]] == ["s1"]
    assert page["total"] == 1 and page["next_offset"] is None

    await client.cancel("s1")
    assert (await client.status("s1"))["desired"] is False


@pytest.mark.timeout(90)
async def test_start_many_brings_120_sessions_up_and_their_events_flow(
    client: PoolClient, upstream: SSEUpstream, pool: Pool
) -> None:
    sids = [f"many{i}" for i in range(120)]
    results = await client.start_many(
        [{"sid": sid, "url": upstream.url(sid)} for sid in sids], per_request=50
    )
    assert [(r["sid"], r["outcome"]) for r in results] == [(sid, "created") for sid in sids]

    async def all_listening() -> bool:
        states = await pool.states(sids)
        return all(s.get("state") == "listening" for s in states.values())

    await eventually(all_listening, 60, "the batch's sessions are not all listening")
    assert_numbered(await take(client, "many119", 3), first=1)


@pytest.mark.timeout(60)
async def test_stopping_iteration_closes_the_websocket(
    client: PoolClient, upstream: SSEUpstream, pool: Pool
) -> None:
    await client.start("s1", upstream.url("s1"))
    await listening(client, "s1")

    # break out of the loop: dropping the iterator closes its connection
    async for item in client.events("s1"):
        assert isinstance(item, Event)
        assert await live_subscribers(pool, "s1") == 1
        break
    await eventually(lambda: live_subscribers_is(pool, "s1", 0), 10, "connection left open")

    # explicit aclose, and last_seq to resume from
    stream = client.events("s1", after=3)
    first = await anext(stream)
    assert isinstance(first, Event) and first.seq == 4 and stream.last_seq == 4
    assert await live_subscribers(pool, "s1") == 1
    await stream.aclose()
    await eventually(lambda: live_subscribers_is(pool, "s1", 0), 10, "connection left open")

    # closing the client ends an iterator that is waiting for events
    items: list[Event | Reset] = []

    async def consume() -> None:
        async for item in client.events("s1"):
            items.append(item)

    task = asyncio.create_task(consume())
    await eventually(lambda: len(items) >= 3, 10)
    await client.aclose()
    async with asyncio.timeout(10):
        await task  # ends without an error
    await eventually(lambda: live_subscribers_is(pool, "s1", 0), 10, "connection left open")


async def live_subscribers_is(pool: Pool, sid: str, n: int) -> bool:
    return await live_subscribers(pool, sid) == n


@pytest.mark.timeout(60)
async def test_reconnects_across_a_gateway_restart_without_gap_or_duplicate(
    redis_url: str,
    gateway: tuple[subprocess.Popen[bytes], str],
    gateway_processes: GatewayProcesses,
    upstream: SSEUpstream,
    pool: Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc, base = gateway
    items: list[Event | Reset] = []
    async with PoolClient(base) as client:
        await client.start("s1", upstream.url("s1"))
        await listening(client, "s1")

        async def consume() -> None:
            stream = client.events("s1", reconnect_delay=0.05, max_reconnect_delay=0.5)
            async for item in stream:
                items.append(item)

        task = asyncio.create_task(consume())
        try:
            await eventually(lambda: len(items) >= 20, 20, "no events before the restart")
            proc.kill()
            await asyncio.to_thread(proc.wait)
            at_kill = int(await pool.redis.xlen("lp:{s1}:events"))

            # The worker keeps publishing while no gateway runs; the client keeps retrying.
            async def published_while_down() -> bool:
                return int(await pool.redis.xlen("lp:{s1}:events")) >= at_kill + 25

            await eventually(published_while_down, 20, "worker stopped publishing")
            # Nothing arrives without a gateway: what the client still took from its buffers
            # (however late a loaded machine let it) was published before the kill.
            assert all(isinstance(i, Event) and i.seq <= at_kill for i in items), items[-3:]
            assert not task.done()

            port = urlsplit(base).port
            _, base_b = await asyncio.to_thread(
                gateway_processes.start, redis_url, "gw1b", port=port
            )
            assert base_b == base

            await eventually(lambda: len(items) >= at_kill + 60, 20, "did not reconnect")
        finally:
            await cancel_until_done(task)
    assert_numbered(items, first=1)


@pytest.mark.timeout(60)
async def test_errors(client: PoolClient, upstream: SSEUpstream) -> None:
    for call in (
        client.start("bad sid!", upstream.url("x")),
        client.status("bad sid!"),
        client.cancel(""),
        anext(client.events("a/b")),
    ):
        with pytest.raises(PoolClientError) as bad:
            await call
        assert (bad.value.status, bad.value.code) == (400, "invalid_session_id")

    with pytest.raises(PoolClientError) as bad_url:
        await client.start("s1", "ftp://example.invalid/x")
    assert (bad_url.value.status, bad_url.value.code) == (400, "invalid_upstream")
    assert bad_url.value.message

    for call in (client.status("nope"), client.cancel("nope"), anext(client.events("nope"))):
        with pytest.raises(PoolClientError) as unknown:
            await call
        assert (unknown.value.status, unknown.value.code) == (404, "unknown_session")
        assert "nope" in unknown.value.message


# -- protocol edge cases against a scripted server -------------------------------------------
def envelope(seq: int) -> str:
    return json.dumps({"seq": seq, "epoch": 1, "event": "e", "data": f"d{seq}", "id": str(seq)})


@pytest.mark.timeout(60)
async def test_stream_dedupes_resumes_after_1013_and_gaps_and_surfaces_resets() -> None:
    afters: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        assert urlsplit(ws.request.path).path == "/v1/sessions/s1/events"
        after = int(parse_qs(urlsplit(ws.request.path).query)["after"][0])
        afters.append(after)
        if len(afters) == 1:  # history trimmed: a reset, a duplicate, junk, then "too slow"
            for frame in ['{"type":"reset","after":0,"first_seq":3}', envelope(3), envelope(4)]:
                await ws.send(frame)
            await ws.send(envelope(4))
            await ws.send("not json")
            await ws.send(b"binary")
            await ws.close(1013, "client too slow: resume by seq")
        elif len(afters) == 2:  # replays one it already has, then jumps over 7
            for seq in (4, 5, 6, 8):
                await ws.send(envelope(seq))
            await ws.wait_closed()
        else:  # a stale reset (already past it), the rest, then the session is gone
            for frame in ['{"type":"reset","after":0,"first_seq":3}', envelope(7), envelope(8)]:
                await ws.send(frame)
            await ws.close(4404, "session 's1' does not exist")

    items: list[Event | Reset] = []
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with PoolClient(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(PoolClientError) as gone:
                async for item in client.events("s1", reconnect_delay=0.01):
                    items.append(item)
    assert (gone.value.status, gone.value.code) == (404, "unknown_session")
    assert afters == [0, 4, 6]
    assert items[0] == Reset(after=0, first_seq=3, sid="s1")
    assert [i.seq for i in items[1:] if isinstance(i, Event)] == [3, 4, 5, 6, 7, 8]
    assert len(items) == 7
    assert items[1] == Event(seq=3, epoch=1, event="e", data="d3", id="3", sid="s1")


# -- several sessions over one connection ----------------------------------------------------
@pytest.mark.timeout(90)
async def test_stream_follows_several_sessions_across_a_gateway_restart(
    redis_url: str,
    gateway: tuple[subprocess.Popen[bytes], str],
    gateway_processes: GatewayProcesses,
    upstream: SSEUpstream,
    pool: Pool,
) -> None:
    proc, base = gateway
    sids = ["m1", "m2", "m3"]
    items: list[Event | Reset] = []
    async with PoolClient(base) as client:
        for sid in sids:
            await client.start(sid, upstream.url(sid))
        for sid in sids:
            await listening(client, sid)
        stream = client.stream(sids, after={"m2": 5}, reconnect_delay=0.05, max_reconnect_delay=0.5)

        async def consume() -> None:
            async for item in stream:
                items.append(item)

        def each_has(n: int) -> bool:
            return all(sum(i.sid == sid for i in items) >= n for sid in sids)

        task = asyncio.create_task(consume())
        try:
            await eventually(lambda: each_has(10), 20, "no events before the restart")
            proc.kill()
            await asyncio.to_thread(proc.wait)
            port = urlsplit(base).port
            await asyncio.to_thread(gateway_processes.start, redis_url, "gw1b", port=port)
            got = {sid: sum(i.sid == sid for i in items) for sid in sids}
            await eventually(lambda: each_has(max(got.values()) + 30), 30, "did not reconnect")
        finally:
            await cancel_until_done(task)
        positions = stream.positions
    for sid in sids:
        mine = [i for i in items if i.sid == sid]
        assert_numbered(mine, first=6 if sid == "m2" else 1)
        assert positions[sid] == mine[-1].seq  # type: ignore[union-attr]


@pytest.mark.timeout(60)
async def test_stream_errors(client: PoolClient, upstream: SSEUpstream) -> None:
    await client.start("s1", upstream.url("s1"))
    with pytest.raises(PoolClientError) as unknown:
        async with asyncio.timeout(20):
            async for _ in client.stream(["s1", "nope"]):
                pass
    assert (unknown.value.status, unknown.value.code) == (404, "unknown_session")
    assert "nope" in unknown.value.message
    with pytest.raises(PoolClientError) as bad:
        client.stream(["s1", "a/b"])
    assert (bad.value.status, bad.value.code) == (400, "invalid_session_id")
    for sids in ([], ["s1", "s1"]):
        with pytest.raises(ValueError):
            client.stream(sids)


@pytest.mark.timeout(60)
async def test_stream_dedupes_resubscribes_after_1013_and_gaps_and_surfaces_resets() -> None:
    subscribes: list[list[tuple[str, int]]] = []

    def frame(sid: str, seq: int) -> str:
        return json.dumps({"sid": sid, **json.loads(envelope(seq))})

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None and ws.request.path == "/v1/stream"
        mine = []
        for _ in range(2):
            sub = json.loads(await ws.recv())
            assert sub["op"] == "subscribe"
            mine.append((sub["sid"], sub["after"]))
        subscribes.append(mine)
        if len(subscribes) == 1:  # a trimmed history for a, a duplicate, junk, then too slow
            await ws.send(json.dumps({"op": "subscribed", "sid": "a", "after": 0}))
            reset = {"op": "reset", "sid": "a", "after": 0, "first_seq": 3}
            for text in [json.dumps(reset), frame("a", 3), frame("b", 1), frame("a", 3)]:
                await ws.send(text)
            await ws.send(frame("other", 1))  # not followed: ignored
            await ws.send("not json")
            await ws.close(1013, "client too slow")
        elif len(subscribes) == 2:  # b jumps over 3: reconnect
            for text in [frame("b", 2), frame("b", 4)]:
                await ws.send(text)
            await ws.wait_closed()
        else:  # the rest, then a passes away
            for text in [frame("b", 3), frame("a", 4)]:
                await ws.send(text)
            error = {"op": "error", "sid": "a", "code": "unknown_session", "message": "gone"}
            await ws.send(json.dumps(error))
            await ws.wait_closed()

    items: list[Event | Reset] = []
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with PoolClient(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(PoolClientError) as gone:
                async for item in client.stream(["a", "b"], reconnect_delay=0.01):
                    items.append(item)
    assert (gone.value.status, gone.value.code) == (404, "unknown_session")
    assert subscribes == [[("a", 0), ("b", 0)], [("a", 3), ("b", 1)], [("a", 3), ("b", 2)]]
    assert items[0] == Reset(after=0, first_seq=3, sid="a")
    seen = [(i.sid, i.seq) for i in items[1:] if isinstance(i, Event)]
    assert seen == [("a", 3), ("b", 1), ("b", 2), ("b", 3), ("a", 4)]
    assert items[1] == Event(seq=3, epoch=1, event="e", data="d3", id="3", sid="a")


@pytest.mark.timeout(90)
def test_tail_prints_several_sessions_over_one_connection(
    gateway: tuple[subprocess.Popen[bytes], str], upstream: SSEUpstream
) -> None:
    base = gateway[1]
    sids = ["t1", "t2"]
    with httpx.Client(base_url=base, trust_env=False, timeout=10) as http:
        for sid in sids:
            resp = http.put(f"/v1/sessions/{sid}", json={"url": upstream.url(sid)})
            assert resp.status_code == 201, resp.text
    tail = subprocess.Popen(
        [str(BIN / "listenerpool"), "tail", *sids, "--after", "2", "--gateway", base],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    seqs: dict[str, list[int]] = {sid: [] for sid in sids}
    try:
        assert tail.stdout is not None
        while min(len(v) for v in seqs.values()) < 10:  # the test's timeout bounds the wait
            sid, seq, event, data = tail.stdout.readline().rstrip("\n").split("\t")
            assert SSEUpstream.number_of(data) == int(seq) and event
            seqs[sid].append(int(seq))
    finally:
        tail.send_signal(signal.SIGINT)
        tail.wait(10)
    for sid in sids:
        assert seqs[sid] == list(range(3, 3 + len(seqs[sid]))), (sid, seqs[sid])
