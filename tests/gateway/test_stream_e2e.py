"""Many sessions over one connection (``/v1/stream``), end to end: real ``python -m gateway`` and
``python -m workers`` processes, a real redis-server and the scripted upstream, judged from
outside as a client would (the frames it receives, statuses and JSON error bodies)."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from gateway.streamproto import MAX_SEQ, encode_position_id, list_tag
from listenerpool.auth import sign_subscribe_token
from listenerpool.sse import SSEParser
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import GatewayProcesses, WorkerProcesses, eventually
from tests.gateway.rawws import RawWebSocket
from tests.gateway.test_gateway_e2e import (
    TOO_SLOW,
    assert_error,
    describe_gaps,
    established,
    http_client,
    open_ws,
    put_session,
    start_gateways,
    start_workers,
)

TOKEN = "stream-api-token-0123456789"
KEY = "stream-signing-key-0123456789abcdef"


@dataclass
class Streams:
    """What one multiplexed client saw: per session, event seqs and upstream numbers in arrival
    order; control frames; why each connection before the last one ended."""

    seqs: dict[str, list[int]] = field(default_factory=dict)
    numbers: dict[str, list[int]] = field(default_factory=dict)
    controls: list[dict[str, Any]] = field(default_factory=list)
    ends: list[str] = field(default_factory=list)
    connects: int = 0
    last_id: str | None = None

    def add(self, obj: dict[str, Any]) -> None:
        if "op" in obj:
            self.controls.append(obj)
            return
        self.seqs.setdefault(obj["sid"], []).append(int(obj["seq"]))
        self.numbers.setdefault(obj["sid"], []).append(SSEUpstream.number_of(obj["data"]))

    def last(self, sid: str, after: int = 0) -> int:
        got = self.seqs.get(sid)
        return got[-1] if got else after

    def reached(self, until: dict[str, int]) -> bool:
        return all(self.last(sid) >= seq for sid, seq in until.items())

    def errors(self) -> list[tuple[str | None, str]]:
        return [(c["sid"], c["code"]) for c in self.controls if c["op"] == "error"]

    def assert_complete(self, until: dict[str, int], after: dict[str, int] | None = None) -> None:
        """Every session: seqs ``after+1 .. until`` once, in order, upstream number == seq."""
        after = after or {}
        for sid, last in until.items():
            want = list(range(after.get(sid, 0) + 1, last + 1))
            got = self.seqs.get(sid, [])
            assert got == want, f"{sid}: {describe_gaps(got)}, wanted {want[:1]}..{want[-1:]}"
            assert self.numbers[sid] == got, f"{sid}: upstream numbers differ from seqs"
        resets = [c for c in self.controls if c["op"] == "reset"]
        assert not resets, resets


def stream_url(base: str, sessions: str = "", *, ws: bool = False, token: str = "") -> str:
    url = f"{base}/v1/stream"
    if ws:
        url = "ws://" + url.removeprefix("http://")
    query = []
    if sessions:
        query.append(f"sessions={quote(sessions, safe=',:')}")
    if token:
        query.append(f"token={quote(token)}")
    return url + ("?" + "&".join(query) if query else "")


async def ws_follow(
    base: str,
    after: dict[str, int],
    until: dict[str, int],
    rec: Streams,
    *,
    token: str = "",
    frames: list[str] | None = None,
    max_connects: int = 1,
) -> None:
    """Follow sessions over one WebSocket (subscribe frames, then ``frames``) until each reaches
    ``until``; on a close, reconnect and resubscribe after the last seq of each."""
    for _ in range(max_connects):
        try:
            async with open_ws(stream_url(base, ws=True, token=token)) as conn:
                rec.connects += 1
                for sid, start in after.items():
                    frame = {"op": "subscribe", "sid": sid, "after": rec.last(sid, start)}
                    await conn.send(json.dumps(frame))
                for text in frames or []:
                    await conn.send(text)
                frames = None
                async for text in conn:
                    rec.add(json.loads(text))
                    if rec.reached(until):
                        return
                rec.ends.append(f"closed {conn.close_code}")
        except ConnectionClosed as exc:
            rec.ends.append(f"closed {exc.rcvd.code if exc.rcvd else None}")
    raise AssertionError(f"ended {max_connects} times: {rec.ends}, at {rec.seqs.keys()}")


async def sse_follow(
    client: httpx.AsyncClient,
    bases: list[str],
    sessions: str,
    until: dict[str, int],
    rec: Streams,
    *,
    token: str = "",
    stop_after: int | None = None,
) -> None:
    """Follow ``/v1/stream?sessions=`` as a browser's EventSource does: on an end, reconnect
    (to the next of ``bases``) sending the last ``id:`` as ``Last-Event-ID``. With
    ``stop_after``, each connection is dropped by the client after that many events."""
    for i in range(20):
        base = bases[i % len(bases)]
        headers = {"Last-Event-ID": rec.last_id} if rec.last_id else {}
        got = 0
        async with client.stream(
            "GET", stream_url(base, sessions, token=token), headers=headers
        ) as resp:
            rec.connects += 1
            assert resp.status_code == 200, (await resp.aread())[:300]
            assert resp.headers["content-type"].startswith("text/event-stream")
            parser = SSEParser()
            async for chunk in resp.aiter_raw():
                for event in parser.feed(chunk):
                    assert event.type == "message", event  # no event: field
                    obj = json.loads(event.data)
                    if "op" not in obj or obj["op"] == "reset":
                        assert event.id, f"an event without an id: {event}"
                        rec.last_id = event.id
                    rec.add(obj)
                    got += "op" not in obj
                    if rec.reached(until):
                        return
                if stop_after is not None and got >= stop_after:
                    break
        rec.ends.append(f"{base} after {got}")
    raise AssertionError(f"20 connections did not complete: {rec.ends}")


@pytest.fixture
def fast_upstream() -> SSEUpstream:
    with SSEUpstream(rate=200.0, heartbeat=0.5) as server:
        yield server  # type: ignore[misc]


async def put_all(base: str, upstream: SSEUpstream, sids: list[str], total: int | None) -> None:
    """Declare each session on its own upstream stream of ``total`` events (None: endless)."""
    async with http_client() as client:
        for sid in sids:
            upstream.configure(sid, total=total)
            resp = await put_session(client, base, sid, upstream.url(sid))
            assert resp.status_code == 201, resp.text


# -- WebSocket -------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
async def test_one_websocket_follows_many_sessions_each_complete_with_per_session_errors(
    redis_url: str,
    fast_upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    total = 300
    sids = [f"ws-mux-{i}" for i in range(6)]
    start_workers(worker_processes, redis_url, 1)
    [base] = await start_gateways(gateway_processes, redis_url, 1)
    await put_all(base, fast_upstream, sids, total)

    rec = Streams()
    after = {sid: 0 for sid in sids}
    after[sids[1]] = 100  # joins mid-history
    mistakes = [
        json.dumps({"op": "subscribe", "sid": "no-such-session"}),
        json.dumps({"op": "subscribe", "sid": sids[0]}),  # already followed
        json.dumps({"op": "unsubscribe", "sid": "never-followed"}),
        json.dumps({"op": "subscribe", "sid": "bad/id"}),
        json.dumps({"op": "publish", "sid": sids[2]}),
        "not json",
    ]
    until = dict.fromkeys(sids, total)
    await asyncio.wait_for(ws_follow(base, after, until, rec, frames=mistakes), 60)

    rec.assert_complete(until, after)
    assert rec.connects == 1
    assert sorted(rec.errors(), key=str) == sorted(
        [
            ("no-such-session", "unknown_session"),
            (sids[0], "already_subscribed"),
            ("never-followed", "not_subscribed"),
            (None, "invalid_session_id"),
            (sids[2], "bad_frame"),
            (None, "bad_frame"),
        ],
        key=str,
    )
    subscribed = {c["sid"]: c["after"] for c in rec.controls if c["op"] == "subscribed"}
    assert subscribed == after


@pytest.mark.timeout(90)
async def test_unsubscribe_ends_a_sessions_frames_and_the_limit_counts_followed_sessions(
    redis_url: str,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    a, b, c = "unsub-a", "unsub-b", "unsub-c"
    start_workers(worker_processes, redis_url, 1)
    [base] = await start_gateways(gateway_processes, redis_url, 1, max_sessions_per_stream=2)
    await put_all(base, upstream, [a, b], None)  # endless, at 50 events/s
    await put_all(base, upstream, [c], 40)

    frames: list[dict[str, Any]] = []
    async with open_ws(stream_url(base, f"{a},{b}", ws=True)) as conn:

        async def until(predicate: Any) -> None:
            async with asyncio.timeout(30):
                while not predicate():
                    frames.append(json.loads(await conn.recv()))

        await until(lambda: sum(f.get("sid") == a and "seq" in f for f in frames) >= 3)
        await conn.send(json.dumps({"op": "subscribe", "sid": c}))
        await until(lambda: any(f.get("code") == "too_many_sessions" for f in frames))
        await conn.send(json.dumps({"op": "unsubscribe", "sid": a}))
        await until(lambda: any(f.get("op") == "unsubscribed" for f in frames))
        cut = len(frames)
        await conn.send(json.dumps({"op": "subscribe", "sid": c}))  # room again
        await until(lambda: any(f.get("sid") == c and f.get("seq") == 40 for f in frames))

    assert [f["sid"] for f in frames if f.get("code") == "too_many_sessions"] == [c]
    assert not [f for f in frames[cut:] if f.get("sid") == a], "frames of a after unsubscribed"
    for sid in (a, b, c):
        seqs = [f["seq"] for f in frames if f.get("sid") == sid and "seq" in f]
        assert seqs == list(range(1, len(seqs) + 1)), f"{sid}: {describe_gaps(seqs)}"
    assert [f["seq"] for f in frames if f.get("sid") == c and "seq" in f][-1] == 40


@pytest.mark.timeout(90)
async def test_a_multiplexed_websocket_that_stops_reading_is_closed_with_1013(
    redis_url: str,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    sids = ["slow-mux-a", "slow-mux-b"]
    start_workers(worker_processes, redis_url, 1)
    [base] = await start_gateways(
        gateway_processes, redis_url, 1, client_queue=64, client_queue_bytes=65536
    )
    gateway = gateway_processes.procs[-1]
    for sid in sids:
        upstream.configure(sid, rate=0, total=None, mode="stall")
    async with http_client() as client:
        for sid in sids:
            assert (await put_session(client, base, sid, upstream.url(sid))).status_code == 201
    await eventually(lambda: all(upstream.stats(s).concurrent == 1 for s in sids), 15, "readers")

    slow = await RawWebSocket.connect(base, f"/v1/stream?sessions={','.join(sids)}")
    subscribed = []
    while len(subscribed) < 2:
        item = await slow.frame()
        assert item is not None
        subscribed.append(json.loads(item[1])["op"])
    assert subscribed == ["subscribed", "subscribed"]
    for sid in sids:
        upstream.configure(sid, mode="normal")  # endless bursts; the client reads nothing
    await eventually(lambda: not established(gateway, slow.local_port), 60, "slow client held")

    last: dict[str, int] = {}
    closes = []
    while (item := await slow.frame()) is not None:
        opcode, payload = item
        if opcode == 0x1:
            obj = json.loads(payload)
            assert obj["seq"] == last.get(obj["sid"], 0) + 1, obj  # a gap-free prefix each
            last[obj["sid"]] = obj["seq"]
        elif opcode == 0x8:
            closes.append(struct.unpack(">H", payload[:2])[0])
    slow.close()
    assert closes in ([], [TOO_SLOW]), closes


@pytest.mark.timeout(60)
async def test_websocket_stream_refusals_are_close_codes(
    redis_url: str, gateway_processes: GatewayProcesses
) -> None:
    [base] = await start_gateways(
        gateway_processes, redis_url, 1, api_token=TOKEN, max_sessions_per_stream=2
    )
    for query, code in [("", 4401), (f"?token={TOKEN}&sessions=a,b,c", 4400)]:
        async with open_ws(f"ws://{base.removeprefix('http://')}/v1/stream{query}") as conn:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(conn.recv(), 10)
            assert conn.close_code == code, (query, conn.close_code, conn.close_reason)


# -- SSE -------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_one_sse_stream_resumes_every_session_from_its_last_id_on_any_gateway(
    redis_url: str,
    fast_upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    total = 400
    sids = [f"sse-mux-{i}" for i in range(5)]
    start_workers(worker_processes, redis_url, 1)
    bases = await start_gateways(gateway_processes, redis_url, 2)
    await put_all(bases[0], fast_upstream, sids, total)

    sessions = ",".join([f"{sids[0]}:50", *sids[1:], "no-such-session"])
    until = dict.fromkeys(sids, total)
    rec = Streams()
    async with http_client() as client:
        # Each connection is dropped after 150 events and resumed on the other gateway.
        await asyncio.wait_for(sse_follow(client, bases, sessions, until, rec, stop_after=150), 90)
    rec.assert_complete(until, {sids[0]: 50})
    assert rec.connects > 1, "the stream was never resumed"
    assert set(rec.errors()) == {("no-such-session", "unknown_session")}


@pytest.mark.timeout(60)
async def test_sse_stream_mistakes_are_400_json(
    redis_url: str, gateway_processes: GatewayProcesses
) -> None:
    [base] = await start_gateways(gateway_processes, redis_url, 1, max_sessions_per_stream=3)
    async with http_client() as client:
        for query, code in [
            ("", "invalid_sessions"),
            ("?sessions=", "invalid_sessions"),
            ("?sessions=a,a", "invalid_sessions"),
            ("?sessions=a,b/c", "invalid_session_id"),
            ("?sessions=a:x", "invalid_after"),
            ("?sessions=a,b,c,d", "too_many_sessions"),
        ]:
            assert_error(await client.get(f"{base}/v1/stream{query}"), 400, code)
        for last_id in ["12", "garbage", "00000000.1.2", "a.b.c.d.e.f"]:
            resp = await client.get(
                f"{base}/v1/stream?sessions=a,b", headers={"Last-Event-ID": last_id}
            )
            assert_error(resp, 400, "invalid_last_event_id")


# -- auth ------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
async def test_a_subscribe_token_naming_several_sessions_opens_only_those(
    redis_url: str,
    fast_upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    total = 50
    a, b, c = "tok-a", "tok-b", "tok-c"
    start_workers(worker_processes, redis_url, 1)
    [base] = await start_gateways(
        gateway_processes,
        redis_url,
        1,
        api_token=TOKEN,
        signing_key=KEY,
        max_sessions_per_stream=3,
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with http_client() as client:
        for sid in (a, b, c):
            fast_upstream.configure(sid, total=total)
            resp = await client.put(
                f"{base}/v1/sessions/{sid}", json={"url": fast_upstream.url(sid)}, headers=auth
            )
            assert resp.status_code == 201, resp.text
        issue = f"{base}/v1/subscribe-token"
        resp = await client.post(issue, json={"sessions": [a, b], "ttl": 600}, headers=auth)
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["sessions"] == [a, b] and body["expires_at"] > 0
        token = body["token"]

        assert_error(await client.post(issue, json={"sessions": [a]}), 401, "missing_token")
        for sessions, status, code in [
            ([], 400, "invalid_request"),
            ([a, a], 400, "invalid_sessions"),
            ([a, "bad/id"], 400, "invalid_session_id"),
            ([a, b, c, "d"], 400, "too_many_sessions"),
            ([a, "no-such-session"], 404, "unknown_session"),
        ]:
            resp = await client.post(issue, json={"sessions": sessions}, headers=auth)
            assert_error(resp, status, code)

        # SSE: the token's sessions flow; the third gets an error frame, nothing else.
        until = {a: total, b: total}
        rec = Streams()
        await asyncio.wait_for(
            sse_follow(client, [base], f"{a},{b},{c}", until, rec, token=token), 60
        )
        rec.assert_complete(until)
        assert rec.errors() == [(c, "forbidden")]
        assert c not in rec.seqs
        assert_error(await client.get(stream_url(base, a)), 401, "missing_token")
        assert_error(await client.get(stream_url(base, a, token="x.y")), 401)

    # WebSocket: the same token, the same refusal for the third session.
    rec = Streams()
    await asyncio.wait_for(ws_follow(base, {a: 0, b: 0, c: 0}, until, rec, token=token), 60)
    rec.assert_complete(until)
    assert rec.errors() == [(c, "forbidden")]

    # A subscribe frame may bring its own token: connected with a's, b joins with b's; c with
    # a's token, or with one that is not valid, is refused alone.
    async with http_client() as client:
        tokens = {}
        for sid in (a, b):
            resp = await client.post(issue, json={"sessions": [sid]}, headers=auth)
            tokens[sid] = resp.json()["token"]
    rec = Streams()
    frames = [
        json.dumps({"op": "subscribe", "sid": b, "token": tokens[b]}),
        json.dumps({"op": "subscribe", "sid": c, "token": tokens[a]}),
        json.dumps({"op": "subscribe", "sid": c, "token": "not.valid"}),
    ]
    await asyncio.wait_for(ws_follow(base, {a: 0}, until, rec, token=tokens[a], frames=frames), 60)
    rec.assert_complete(until)
    assert rec.errors() == [(c, "forbidden"), (c, "invalid_token")]


@pytest.mark.timeout(90)
async def test_a_stream_counts_once_towards_the_gateway_and_once_per_session(
    redis_url: str,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    a, b = "lim-a", "lim-b"
    start_workers(worker_processes, redis_url, 1)
    [base] = await start_gateways(
        gateway_processes, redis_url, 1, max_clients=2, max_clients_per_session=1
    )
    await put_all(base, upstream, [a, b], None)
    async with http_client() as client, client.stream("GET", f"{base}/v1/sessions/{a}/events"):
        # a's one place is taken by a client of its own route: the stream gets an error
        # frame for a, and b's events.
        frames: list[dict[str, Any]] = []
        async with open_ws(stream_url(base, f"{a},{b}", ws=True)) as conn:
            async with asyncio.timeout(30):
                while not any(f.get("sid") == b and f.get("seq") == 3 for f in frames):
                    frames.append(json.loads(await conn.recv()))
            errors = [(f["sid"], f["code"]) for f in frames if f.get("op") == "error"]
            assert errors == [(a, "too_many_clients")]
            # Two clients in all: the stream is the second, a third is refused.
            assert_error(await client.get(stream_url(base, b)), 503, "gateway_full")
            async with open_ws(stream_url(base, b, ws=True)) as third:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(third.recv(), 10)
                assert third.close_code == 4503, third.close_reason


@pytest.mark.timeout(90)
async def test_the_largest_sse_stream_request_fits(
    redis_url: str, gateway_processes: GatewayProcesses
) -> None:
    """256 sessions (the default limit) of the longest ids, each with the largest seq, a
    subscribe token naming them all and the longest Last-Event-ID: one request head the gateway
    takes, even when it arrives in pieces (h11 alone refuses an unfinished head over 16 KiB)."""
    [base] = await start_gateways(gateway_processes, redis_url, 1, signing_key=KEY)
    sids = [f"{i:03d}-" + "x" * 124 for i in range(256)]
    token = sign_subscribe_token([KEY], sids, int(time.time()) + 600)
    last_id = encode_position_id(list_tag(sids), [MAX_SEQ] * len(sids))
    target = stream_url("", ",".join(f"{sid}:{MAX_SEQ}" for sid in sids), token=token)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    head = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nLast-Event-ID: {last_id}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    assert len(head) > 5 * 16_384
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head[:-4])  # an unfinished head, then the rest
        await writer.drain()
        writer.write(head[-4:])
        await writer.drain()
        async with asyncio.timeout(30):
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            body = b""
            while body.count(b"unknown_session") < len(sids):
                chunk = await reader.read(65536)
                assert chunk, body[-300:]
                body += chunk
    finally:
        writer.close()
    frames = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert sorted(f["sid"] for f in frames) == sids
    assert {f["code"] for f in frames} == {"unknown_session"}
    async with http_client() as client:
        one_more = stream_url(base, ",".join(f"s{i}" for i in range(257)), token=token)
        assert_error(await client.get(one_more), 400, "too_many_sessions")
