"""Tests of the AG-UI-style demo upstream: wire format, run shape, resume, heartbeats, lifecycle."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from listenerpool.cli.demo_upstream import (
    MIN_RUN_EVENTS,
    DemoUpstream,
    create_demo_app,
    demo_event,
    run_event_types,
    serve_demo_upstream,
)
from listenerpool.sse import SSEEvent, SSEParser

pytestmark = pytest.mark.timeout(30)

FAST = 2000.0  # events/s: a run of 40 in ~20 ms
READ_TIMEOUT = 10.0

FIRST_RUN_TYPES = (
    ["RUN_STARTED", "TEXT_MESSAGE_START"]
    + ["TEXT_MESSAGE_CONTENT"] * 30
    + ["TEXT_MESSAGE_END", "TOOL_CALL_START"]
    + ["TOOL_CALL_ARGS"] * 3
    + ["TOOL_CALL_END", "STATE_SNAPSHOT", "RUN_FINISHED"]
)


@dataclass
class Read:
    """What one connection delivered before the reader hung up."""

    status: int
    content_type: str
    events: list[SSEEvent] = field(default_factory=list)
    raw: bytes = b""
    retry: int | None = None
    last_event_id: str = ""


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=READ_TIMEOUT)


async def read_stream(
    url: str,
    until: Callable[[Read], bool],
    *,
    last_event_id: str | None = None,
) -> Read:
    """Read ``url`` feeding raw bytes to an ``SSEParser`` until ``until(read)``, then hang up."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    parser = SSEParser(last_event_id=last_event_id or "")
    raw = bytearray()
    async with (
        asyncio.timeout(READ_TIMEOUT),
        client() as http,
        http.stream("GET", url, headers=headers) as response,
    ):
        read = Read(response.status_code, response.headers.get("content-type", ""))
        async for chunk in response.aiter_raw():
            raw += chunk
            read.events.extend(parser.feed(chunk))
            read.raw = bytes(raw)
            read.retry = parser.retry
            read.last_event_id = parser.last_event_id
            if until(read):
                break
    return read


async def read_events(url: str, count: int, *, last_event_id: str | None = None) -> Read:
    read = await read_stream(url, lambda r: len(r.events) >= count, last_event_id=last_event_id)
    assert len(read.events) >= count, "the stream ended early"
    del read.events[count:]
    return read


# -- the stream ------------------------------------------------------------------------------
async def test_first_run_has_the_agent_event_order_and_ag_ui_payloads() -> None:
    sid = "thread-42"
    async with DemoUpstream(port=0, rate=FAST) as upstream:
        read = await read_events(upstream.events_url(sid), 40)

    assert read.status == 200
    assert read.content_type.split(";")[0] == "text/event-stream"
    assert read.raw.startswith(b"retry: 2000\n\n")
    assert read.retry == 2000
    assert [e.type for e in read.events] == FIRST_RUN_TYPES == list(run_event_types(40))
    assert [e.id for e in read.events] == [str(n) for n in range(1, 41)]

    payloads = [json.loads(e.data) for e in read.events]
    for n, (event, payload) in enumerate(zip(read.events, payloads, strict=True), start=1):
        assert payload["type"] == event.type
        assert payload["threadId"] == sid
        assert payload["runId"] == "run-1"
        assert payload["seq"] == n
        assert payload == demo_event(sid, n)
    # Each frame is exactly id, event and one data line.
    assert b"id: 1\nevent: RUN_STARTED\ndata: {" in read.raw

    by_type: dict[str, list[dict[str, object]]] = {}
    for payload in payloads:
        by_type.setdefault(payload["type"], []).append(payload)
    message_id = by_type["TEXT_MESSAGE_START"][0]["messageId"]
    assert by_type["TEXT_MESSAGE_START"][0]["role"] == "assistant"
    text_events = by_type["TEXT_MESSAGE_CONTENT"] + by_type["TEXT_MESSAGE_END"]
    assert {p["messageId"] for p in text_events} == {message_id}
    text = "".join(str(p["delta"]) for p in by_type["TEXT_MESSAGE_CONTENT"])
    assert len(text.split()) == 30
    assert all(p["delta"] for p in by_type["TEXT_MESSAGE_CONTENT"])

    start = by_type["TOOL_CALL_START"][0]
    assert start["toolCallName"] == "get_weather"
    assert start["parentMessageId"] == message_id
    tool_events = by_type["TOOL_CALL_ARGS"] + by_type["TOOL_CALL_END"]
    assert {p["toolCallId"] for p in tool_events} == {start["toolCallId"]}
    args = json.loads("".join(str(p["delta"]) for p in by_type["TOOL_CALL_ARGS"]))
    assert set(args) == {"city", "unit"}

    snapshot = by_type["STATE_SNAPSHOT"][0]["snapshot"]
    assert isinstance(snapshot, dict)
    assert snapshot["runCount"] == 1
    assert snapshot["weather"]["city"] == args["city"]
    assert by_type["RUN_FINISHED"][0]["runId"] == "run-1"


async def test_runs_repeat_with_increasing_run_ids() -> None:
    run_events = MIN_RUN_EVENTS
    async with DemoUpstream(port=0, rate=FAST, run_events=run_events) as upstream:
        read = await read_events(upstream.events_url("s"), 3 * run_events)

    types = [e.type for e in read.events]
    assert types == list(run_event_types(run_events)) * 3
    assert types.count("TEXT_MESSAGE_CONTENT") == 3
    run_ids = [json.loads(e.data)["runId"] for e in read.events]
    assert run_ids == [f"run-{r}" for r in (1, 2, 3) for _ in range(run_events)]
    snapshots = [json.loads(e.data) for e in read.events if e.type == "STATE_SNAPSHOT"]
    assert [s["snapshot"]["runCount"] for s in snapshots] == [1, 2, 3]


async def test_session_ids_with_any_characters_round_trip() -> None:
    sid = "user 7/sesión#1"
    async with DemoUpstream(port=0, rate=FAST) as upstream:
        read = await read_events(upstream.events_url(sid), 2)
    assert [json.loads(e.data)["threadId"] for e in read.events] == [sid, sid]


@pytest.mark.parametrize("cut", [1, 25, 40, 41])
async def test_last_event_id_resume_is_the_uninterrupted_continuation(cut: int) -> None:
    total = 60
    async with DemoUpstream(port=0, rate=FAST) as upstream:
        url = upstream.events_url("resume-me")
        whole = await read_events(url, total)
        head = await read_events(url, cut)
        assert head.last_event_id == str(cut)
        tail = await read_events(url, total - cut, last_event_id=head.last_event_id)

    assert tail.raw.startswith(b"retry: 2000\n\n")
    assert tail.events[0].id == str(cut + 1)
    assert head.events + tail.events == whole.events


@pytest.mark.parametrize("header", ["", "abc", "-3", "1.5", "12abc"])
async def test_unusable_last_event_id_starts_from_the_first_event(header: str) -> None:
    async with DemoUpstream(port=0, rate=FAST) as upstream:
        read = await read_events(upstream.events_url("s"), 1, last_event_id=header)
    assert read.events[0].id == "1"
    assert read.events[0].type == "RUN_STARTED"


async def test_heartbeats_are_sent_while_events_are_slow() -> None:
    async with DemoUpstream(port=0, rate=0.01, heartbeat=0.05) as upstream:
        read = await read_stream(
            upstream.events_url("quiet"), lambda r: r.raw.count(b": heartbeat\n\n") >= 3
        )
    # rate 0.01/s: the first event goes at once, the next only after 100 s.
    assert [e.id for e in read.events] == ["1"]
    assert read.raw.startswith(b"retry: 2000\n\nid: 1\nevent: RUN_STARTED\n")
    assert read.raw.endswith(b": heartbeat\n\n")


async def test_stream_is_a_pure_function_of_session_and_number() -> None:
    assert demo_event("a", 17) == demo_event("a", 17)
    assert demo_event("a", 41)["runId"] == "run-2"
    assert demo_event("a", 41)["type"] == "RUN_STARTED"
    assert demo_event("b", 1)["threadId"] == "b"
    # Different sessions are not all the same conversation.
    assert len({json.dumps(demo_event(f"s{i}", 38)) for i in range(20)}) > 1
    with pytest.raises(ValueError):
        demo_event("a", 0)


# -- app and server ----------------------------------------------------------------------------
async def test_healthz_and_unknown_paths() -> None:
    transport = httpx.ASGITransport(app=create_demo_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as http:
        response = await http.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
        assert (await http.get("/events/")).status_code == 404
        assert (await http.get("/nope")).status_code == 404

    async with DemoUpstream(port=0) as upstream, client() as http:
        assert (await http.get(f"{upstream.url}/healthz")).status_code == 200


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0},
        {"rate": -1.0},
        {"rate": math.nan},
        {"heartbeat": 0},
        {"run_events": MIN_RUN_EVENTS - 1},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        create_demo_app(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DemoUpstream(port=0, **kwargs)  # type: ignore[arg-type]


async def test_port_zero_is_known_once_bound() -> None:
    upstream = DemoUpstream(port=0)
    with pytest.raises(RuntimeError):
        _ = upstream.port
    assert DemoUpstream(port=8123).url == "http://127.0.0.1:8123"
    async with upstream:
        assert upstream.port > 0
        assert upstream.url == f"http://127.0.0.1:{upstream.port}"


async def test_stop_ends_open_streams_cleanly_and_closes_the_listener() -> None:
    upstream = DemoUpstream(port=0, rate=0.01, heartbeat=math.inf)
    serving = asyncio.create_task(upstream.serve())
    await upstream.wait_started()
    url = upstream.events_url("s")
    parser = SSEParser()
    events: list[SSEEvent] = []
    async with asyncio.timeout(READ_TIMEOUT), client() as http:
        async with http.stream("GET", url) as response:
            async for chunk in response.aiter_raw():
                events.extend(parser.feed(chunk))
                if events:
                    upstream.stop()
        # The body ended (no exception): the stream was closed cleanly, not cut.
        await serving
        with pytest.raises(httpx.ConnectError):
            await http.get(url)
    assert [e.id for e in events] == ["1"]


async def test_cancelled_serve_shuts_down_gracefully() -> None:
    upstream = DemoUpstream(port=0, rate=0.01)
    serving = asyncio.create_task(upstream.serve())
    await upstream.wait_started()
    read = await read_events(upstream.events_url("s"), 1)
    assert read.events[0].id == "1"
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{upstream.url}/healthz")
    with pytest.raises(RuntimeError):
        await upstream.serve()


async def test_serve_demo_upstream_reports_started_and_runs_until_cancelled() -> None:
    started = asyncio.Event()
    serving = asyncio.create_task(serve_demo_upstream(port=0, started=started))
    async with asyncio.timeout(READ_TIMEOUT):
        await started.wait()
    assert not serving.done()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving


async def test_stop_before_serve_returns_at_once() -> None:
    upstream = DemoUpstream(port=0)
    upstream.stop()
    await upstream.serve()
    with pytest.raises(RuntimeError):
        _ = upstream.port  # it never bound


async def test_an_address_in_use_is_reported_on_entry() -> None:
    async with DemoUpstream(port=0) as first:
        with pytest.raises(OSError):
            async with DemoUpstream(port=first.port):
                pass
