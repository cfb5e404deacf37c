"""Gateway limits in-process on fakeredis: upstream allowlist and header limits on PUT, event
clients per session and per gateway (SSE and WebSocket), and the control API's rate limit.

Event streams never end by themselves, so they are driven at the ASGI level: the test sends
the request or the WebSocket connect and watches what the app sends back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway import create_app
from gateway.limits import ClientLimitReached, ClientLimits
from gateway.ratelimit import RateLimiter, TokenBucket, caller_key, is_limited
from listenerpool.spec import MAX_HEADERS
from listenerpool.tasks import cancel_until_done
from tests.conftest import eventually, fast_settings

pytestmark = pytest.mark.timeout(30)
URL = "http://127.0.0.1:9/events/s1"


@asynccontextmanager
async def gateway(
    fake_redis: Any, fake_sync_redis: Any, **settings: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(
        fast_settings(redis_url="redis://unused", **settings),
        redis=fake_redis,
        sync=fake_sync_redis,
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield app, client


class AsgiCall:
    """One request (``http``) or WebSocket (``websocket``) driven by hand on an ASGI app."""

    def __init__(self, app: FastAPI, kind: str, path: str) -> None:
        scope: dict[str, Any] = {
            "type": kind,
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "scheme": "http" if kind == "http" else "ws",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"gw")],
            "client": ("127.0.0.1", 50000),
            "server": ("gw", 80),
        }
        if kind == "http":
            scope["method"] = "GET"
            first = {"type": "http.request", "body": b"", "more_body": False}
        else:
            scope["subprotocols"] = []
            first = {"type": "websocket.connect"}
        self.sent: list[dict[str, Any]] = []
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.inbox.put_nowait(first)
        self.task = asyncio.create_task(app(scope, self.inbox.get, self._send))

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def kinds(self) -> list[str]:
        return [m["type"] for m in self.sent]

    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    def headers(self) -> dict[str, str]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return {k.decode(): v.decode() for k, v in start["headers"]}

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    def close_message(self) -> dict[str, Any] | None:
        return next((m for m in self.sent if m["type"] == "websocket.close"), None)

    async def leave(self) -> None:
        """The client goes away; the app's handling of it ends."""
        kind = "http.disconnect" if "http.response.start" in self.kinds() else None
        self.inbox.put_nowait({"type": kind or "websocket.disconnect", "code": 1000})
        try:
            async with asyncio.timeout(10):
                await asyncio.shield(self.task)
        except TimeoutError:
            await cancel_until_done(self.task)


async def open_sse(app: FastAPI, sid: str) -> AsgiCall:
    call = AsgiCall(app, "http", f"/v1/sessions/{sid}/events")
    await eventually(lambda: call.status() is not None, 10, "no response start")
    return call


async def open_ws(app: FastAPI, sid: str) -> AsgiCall:
    call = AsgiCall(app, "websocket", f"/v1/sessions/{sid}/events")
    await eventually(lambda: bool(call.sent), 10, "no WebSocket answer")
    return call


# -- PUT: allowlist and header limits ----------------------------------------------------------
@pytest.mark.parametrize(
    ("allow", "url", "reason"),
    [
        (None, "http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
        (None, "http://[fe80::1]:8000/events", "link-local address"),
        (None, "http://metadata.google.internal/x", "cloud metadata host"),
        ("10.0.0.0/8", "http://192.168.1.1/events", "192.168.1.1 is not in LP_UPSTREAM_ALLOW"),
        ("*.example.com", "http://runner.test/events", "host runner.test is not in"),
    ],
)
async def test_put_refuses_an_upstream_outside_the_allowlist_with_403(
    fake_redis: Any, fake_sync_redis: Any, allow: str | None, url: str, reason: str
) -> None:
    async with gateway(fake_redis, fake_sync_redis, upstream_allow=allow) as (_, client):
        resp = await client.put("/v1/sessions/s1", json={"url": url})
        assert resp.status_code == 403
        error = resp.json()["error"]
        assert error["code"] == "upstream_not_allowed"
        assert reason in error["message"]
        assert (await client.get("/v1/sessions/s1")).status_code == 404  # nothing stored


async def test_put_accepts_what_the_allowlist_allows(fake_redis: Any, fake_sync_redis: Any) -> None:
    allow = "10.0.0.0/8, *.example.com, 169.254.169.254/32"
    async with gateway(fake_redis, fake_sync_redis, upstream_allow=allow) as (_, client):
        for sid, url in [
            ("a", "http://10.1.2.3:8000/events/a"),
            ("b", "https://runner.example.com/events/b"),
            ("c", "http://runner.internal/events/c"),  # may resolve into 10/8: worker decides
            ("d", "http://169.254.169.254/named-explicitly"),
        ]:
            assert (await client.put(f"/v1/sessions/{sid}", json={"url": url})).status_code == 201


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({f"X-H{i}": "v" for i in range(MAX_HEADERS + 1)}, 413, "headers_too_large"),
        ({"X-A": "v" * 8193}, 413, "headers_too_large"),
        ({"X-A": "v" * 8000, "X-B": "v" * 8000, "X-C": "v" * 8000}, 413, "headers_too_large"),
        ({"X-A": "ok\r\nX-Evil: 1"}, 400, "invalid_upstream"),
    ],
)
async def test_put_refuses_oversized_or_bad_headers(
    fake_redis: Any, fake_sync_redis: Any, headers: dict[str, str], status: int, code: str
) -> None:
    async with gateway(fake_redis, fake_sync_redis) as (_, client):
        resp = await client.put("/v1/sessions/s1", json={"url": URL, "headers": headers})
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code)


# -- event clients ----------------------------------------------------------------------------
async def test_sse_clients_per_session_are_limited_with_429(
    fake_redis: Any, fake_sync_redis: Any
) -> None:
    async with gateway(fake_redis, fake_sync_redis, max_clients_per_session=2) as (app, client):
        for sid in ("s1", "s2"):
            await client.put(f"/v1/sessions/{sid}", json={"url": URL})
        first, second = await open_sse(app, "s1"), await open_sse(app, "s1")
        assert (first.status(), second.status()) == (200, 200)
        refused = await open_sse(app, "s1")
        await asyncio.wait_for(refused.task, 10)
        assert refused.status() == 429
        assert refused.headers()["retry-after"] == "1"
        assert b'"code":"too_many_clients"' in refused.body()
        assert b"LP_MAX_CLIENTS_PER_SESSION" in refused.body()
        other = await open_sse(app, "s2")  # another session is not affected
        assert other.status() == 200
        await first.leave()
        again = await open_sse(app, "s1")  # a place was freed
        assert again.status() == 200
        for call in (second, other, again):
            await call.leave()
        assert app.state.gateway.clients.count == 0


async def test_clients_per_gateway_are_limited_with_503_and_4503(
    fake_redis: Any, fake_sync_redis: Any
) -> None:
    async with gateway(fake_redis, fake_sync_redis, max_clients=2) as (app, client):
        for sid in ("s1", "s2", "s3"):
            await client.put(f"/v1/sessions/{sid}", json={"url": URL})
        held = [await open_sse(app, "s1"), await open_ws(app, "s2")]
        assert held[0].status() == 200
        assert held[1].kinds()[0] == "websocket.accept"
        assert held[1].close_message() is None
        refused = await open_sse(app, "s3")
        await asyncio.wait_for(refused.task, 10)
        assert refused.status() == 503
        assert b'"code":"gateway_full"' in refused.body()
        ws = await open_ws(app, "s3")
        await eventually(lambda: ws.close_message() is not None, 10, "WebSocket not closed")
        closed = ws.close_message()
        assert closed is not None and closed["code"] == 4503
        assert closed["reason"].startswith("gateway_full: ")
        for call in held:
            await call.leave()
        assert app.state.gateway.clients.count == 0


async def test_websocket_clients_per_session_are_closed_with_4429(
    fake_redis: Any, fake_sync_redis: Any
) -> None:
    async with gateway(fake_redis, fake_sync_redis, max_clients_per_session=1) as (app, client):
        await client.put("/v1/sessions/s1", json={"url": URL})
        first = await open_ws(app, "s1")
        assert first.close_message() is None
        second = await open_ws(app, "s1")
        await eventually(lambda: second.close_message() is not None, 10, "not closed")
        closed = second.close_message()
        assert closed is not None and closed["code"] == 4429
        assert closed["reason"].startswith("too_many_clients: ")
        await first.leave()
        assert app.state.gateway.clients.count == 0


def test_client_limits_count_and_release() -> None:
    limits = ClientLimits(per_session=2, total=3)
    a, b = limits.admit("s1"), limits.admit("s1")
    with pytest.raises(ClientLimitReached) as per_session:
        limits.admit("s1")
    assert (per_session.value.status, per_session.value.code) == (429, "too_many_clients")
    c = limits.admit("s2")
    with pytest.raises(ClientLimitReached) as full:
        limits.admit("s3")
    assert (full.value.status, full.value.code) == (503, "gateway_full")
    a.release()
    a.release()  # idempotent
    assert (limits.count, limits.clients_of("s1")) == (2, 1)
    with limits.admit("s3"):
        assert limits.count == 3
    for admission in (b, c):
        admission.release()
    assert limits.count == 0 and limits.clients_of("s1") == 0


def test_a_multiplexed_connection_counts_once_and_each_of_its_sessions_once() -> None:
    limits = ClientLimits(per_session=1, total=2)
    connection = limits.admit_connection()
    s1 = limits.admit_session("s1")
    assert (limits.count, limits.clients_of("s1")) == (1, 1)
    with pytest.raises(ClientLimitReached) as per_session:
        limits.admit_session("s1")  # the session's one place is taken
    assert (per_session.value.status, per_session.value.code) == (429, "too_many_clients")
    with pytest.raises(ClientLimitReached):
        limits.admit("s1")  # also for a client of its own route
    limits.admit_session("s2").release()  # sessions do not count towards the total
    other = limits.admit_connection()
    with pytest.raises(ClientLimitReached) as full:
        limits.admit_connection()
    assert (full.value.status, full.value.code) == (503, "gateway_full")
    for admission in (s1, s1, connection, other):
        admission.release()
    assert limits.count == 0 and limits.clients_of("s1") == 0 and limits.clients_of("s2") == 0


# -- control API rate limit --------------------------------------------------------------------
def test_token_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0  # one token refilled
    assert bucket.take(100.0) == 0.0
    assert bucket.tokens == pytest.approx(2.0)  # capped at the burst, minus the one taken


def test_rate_limiter_keeps_a_bounded_number_of_callers() -> None:
    now = [0.0]
    limiter = RateLimiter(1.0, 1, max_callers=3, clock=lambda: now[0])
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(1.0)
    for key in ("b", "c", "d"):
        assert limiter.take(key) == 0.0
    assert len(limiter) == 3  # "a" was the least recently seen and went first
    assert limiter.take("a") == 0.0


def test_callers_are_keyed_by_hashed_authorization_else_address() -> None:
    with_token = {"headers": [(b"authorization", b"Bearer secret")], "client": ("10.0.0.1", 1)}
    key = caller_key(with_token)
    assert key.startswith("auth:") and "secret" not in key
    assert caller_key({"headers": [], "client": ("10.0.0.1", 1)}) == "addr:10.0.0.1"
    assert is_limited({"path": "/v1/sessions/s1"})
    assert is_limited({"path": "/v1/workers"})
    assert not is_limited({"path": "/v1/sessions/s1/events"})
    assert not is_limited({"path": "/healthz"})
    assert is_limited({"path": "/api/v1/sessions", "root_path": "/api"})


async def test_control_api_over_the_rate_gets_429_with_retry_after(
    fake_redis: Any, fake_sync_redis: Any
) -> None:
    # One token per 100 s: the bucket stays empty through the test however slow the machine,
    # and Retry-After (rounded up) is 100 s less the time gone since the burst was spent.
    async with gateway(fake_redis, fake_sync_redis, api_rate=0.01, api_burst=2) as (_, client):
        assert [(await client.get("/v1/sessions")).status_code for _ in range(2)] == [200, 200]
        refused = await client.get("/v1/sessions")
        assert refused.status_code == 429
        assert 90 < int(refused.headers["retry-after"]) <= 100
        assert refused.json()["error"]["code"] == "rate_limited"
        put = await client.put("/v1/sessions/s1", json={"url": URL})
        assert put.status_code == 429  # every control route shares the caller's bucket
        # Another token has its own bucket; health and event streams are not limited.
        other = await client.get("/v1/sessions", headers={"Authorization": "Bearer other"})
        assert other.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/sessions/none/events")).status_code == 404


async def test_rate_limit_zero_turns_it_off(fake_redis: Any, fake_sync_redis: Any) -> None:
    async with gateway(fake_redis, fake_sync_redis, api_rate=0, api_burst=1) as (_, client):
        statuses = {(await client.get("/v1/sessions")).status_code for _ in range(20)}
        assert statuses == {200}
