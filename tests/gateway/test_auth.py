"""Who may call the gateway: the control API behind API tokens, event streams behind signed
subscribe tokens, loopback only without a token, and no token in the server's logs. The
gateway runs in-process with its own uvicorn server on fakeredis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from gateway.auth import listen_host
from listenerpool.auth import sign_subscribe_token
from listenerpool.logs import AccessQueryFilter
from tests.conftest import fast_settings
from tests.gateway.served import gateway

pytestmark = pytest.mark.timeout(30)
TOKEN, ROTATED = "api-token-0123456789", "api-token-rotated-000"
KEY = "k" * 32
URL = "http://127.0.0.1:9/events/s1"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def secured(fake_redis: Any, fake_sync_redis: Any) -> AsyncIterator[str]:
    settings = fast_settings(
        redis_url="redis://unused", api_token=f"{TOKEN},{ROTATED}", signing_key=KEY
    )
    async with gateway(settings, fake_redis, fake_sync_redis) as address:
        yield address


# A refusal closes right after the handshake, so a close is waited for this long (a loaded
# machine's delay, no more: the wait ends with the close) ...
CLOSE_WAIT = 10.0
# ... and an accepted stream, which sends nothing here, is told by this much silence.
OPEN_SILENCE = 1.0


async def ws_close_code(url: str, *, silence: float = CLOSE_WAIT, **kwargs: Any) -> int | None:
    """The close code the gateway ends the WebSocket with before any frame, or None when it
    stays open (the first frame, or ``silence`` seconds of nothing)."""
    async with ws_connect(url, open_timeout=10, **kwargs) as ws:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(silence):
                    await ws.recv()
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
    return None


async def test_the_control_api_needs_one_of_the_api_tokens(secured: str) -> None:
    base = f"http://{secured}"
    async with httpx.AsyncClient(base_url=base) as client:
        calls = [
            ("PUT", "/v1/sessions/s1", {"url": URL}),
            ("GET", "/v1/sessions/s1", None),
            ("GET", "/v1/sessions", None),
            ("GET", "/v1/workers", None),
            ("DELETE", "/v1/sessions/s1", None),
            ("POST", "/v1/sessions/s1/subscribe-token", None),
        ]
        for method, path, body in calls:
            bare = await client.request(method, path, json=body)
            assert bare.status_code == 401, (method, path)
            assert bare.json()["error"]["code"] == "missing_token"
            assert bare.headers["www-authenticate"] == "Bearer"
            wrong = await client.request(method, path, json=body, headers=auth("x" * 20))
            assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "invalid_token")
        created = await client.put("/v1/sessions/s1", json={"url": URL}, headers=auth(TOKEN))
        assert created.status_code == 201
        # The rotated-in token works as well as the current one.
        got = await client.get("/v1/sessions/s1", headers=auth(ROTATED))
        assert got.status_code == 200
        # Probes and the schema stay open.
        for path in ("/healthz", "/readyz", "/v1/openapi.json"):
            assert (await client.get(path)).status_code == 200, path


async def test_events_need_a_subscribe_token_for_that_session_or_an_api_token(
    secured: str,
) -> None:
    base = f"http://{secured}"
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        for sid in ("s1", "s2"):
            r = await client.put(f"/v1/sessions/{sid}", json={"url": URL}, headers=auth(TOKEN))
            assert r.status_code == 201
        issued = await client.post(
            "/v1/sessions/s1/subscribe-token", json={"ttl": 60}, headers=auth(TOKEN)
        )
        assert issued.status_code == 201
        token = issued.json()["token"]

        async def sse_status(query: str = "", headers: dict[str, str] | None = None) -> int:
            path = f"/v1/sessions/s1/events{query}"
            async with client.stream("GET", path, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    assert response.json()["error"]["code"]
                return response.status_code

        assert await sse_status() == 401
        assert await sse_status("?token=garbage") == 401
        assert await sse_status(f"?token={token}") == 200
        assert await sse_status(headers=auth(token)) == 200
        assert await sse_status(headers=auth(TOKEN)) == 200
        expired = sign_subscribe_token([KEY], "s1", 1)
        assert await sse_status(f"?token={expired}") == 401
        other = (await client.post("/v1/sessions/s2/subscribe-token", headers=auth(TOKEN))).json()[
            "token"
        ]
        assert await sse_status(f"?token={other}") == 403

    ws = f"ws://{secured}/v1/sessions/s1/events"
    assert await ws_close_code(ws) == 4401
    assert await ws_close_code(f"{ws}?token={expired}") == 4401
    assert await ws_close_code(f"{ws}?token={other}") == 4403
    assert await ws_close_code(f"{ws}?token={token}", silence=OPEN_SILENCE) is None
    assert await ws_close_code(ws, silence=OPEN_SILENCE, additional_headers=auth(ROTATED)) is None


async def test_issuing_subscribe_tokens(
    secured: str, fake_redis: Any, fake_sync_redis: Any
) -> None:
    async with httpx.AsyncClient(base_url=f"http://{secured}") as client:
        unknown = await client.post("/v1/sessions/nope/subscribe-token", headers=auth(TOKEN))
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_session")
        await client.put("/v1/sessions/s1", json={"url": URL}, headers=auth(TOKEN))
        too_long = await client.post(
            "/v1/sessions/s1/subscribe-token", json={"ttl": 10**6}, headers=auth(TOKEN)
        )
        assert too_long.status_code == 400
        default = await client.post("/v1/sessions/s1/subscribe-token", headers=auth(TOKEN))
        body = default.json()
        assert body["sid"] == "s1" and body["expires_at"] > 0 and "." in body["token"]

    no_key = fast_settings(redis_url="redis://unused", api_token=TOKEN)
    async with (
        gateway(no_key, fake_redis, fake_sync_redis) as address,
        httpx.AsyncClient(base_url=f"http://{address}") as client,
    ):
        refused = await client.post("/v1/sessions/s1/subscribe-token", headers=auth(TOKEN))
        assert (refused.status_code, refused.json()["error"]["code"]) == (
            409,
            "signing_disabled",
        )
        # Without a signing key, following a session takes the API token.
        async with client.stream("GET", "/v1/sessions/s1/events") as response:
            assert response.status_code == 401
        async with client.stream("GET", "/v1/sessions/s1/events", headers=auth(TOKEN)) as response:
            assert response.status_code == 200


async def test_without_auth_everything_is_open_on_loopback(
    fake_redis: Any, fake_sync_redis: Any
) -> None:
    settings = fast_settings(redis_url="redis://unused")
    async with (
        gateway(settings, fake_redis, fake_sync_redis) as address,
        httpx.AsyncClient(base_url=f"http://{address}") as client,
    ):
        assert (await client.put("/v1/sessions/s1", json={"url": URL})).status_code == 201
        async with client.stream("GET", "/v1/sessions/s1/events") as response:
            assert response.status_code == 200


def test_without_an_api_token_the_gateway_listens_on_loopback_only_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        assert listen_host(fast_settings(host="0.0.0.0")) == "127.0.0.1"
    assert "LP_API_TOKEN is not set" in caplog.text and "0.0.0.0" in caplog.text
    assert listen_host(fast_settings(host="0.0.0.0", api_token=TOKEN)) == "0.0.0.0"
    assert listen_host(fast_settings(host="::1")) == "::1"
    assert listen_host(fast_settings(host="localhost")) == "localhost"


async def test_tokens_never_reach_the_server_logs(
    secured: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = sign_subscribe_token([KEY], "s1", 2_000_000_000)
    with caplog.at_level(logging.INFO):
        async with httpx.AsyncClient(base_url=f"http://{secured}") as client:
            await client.put("/v1/sessions/s1", json={"url": URL}, headers=auth(TOKEN))
            async with client.stream("GET", f"/v1/sessions/s1/events?after=0&token={token}"):
                pass
        await ws_close_code(
            f"ws://{secured}/v1/sessions/s1/events?token={token}", silence=OPEN_SILENCE
        )
    # What the gateway's side logged (the test's own HTTP client logs its URLs too).
    logged = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name.split(".")[0] in ("uvicorn", "gateway", "listenerpool", "workers")
    )
    assert "/v1/sessions/s1/events" in logged  # the lines are there, ...
    assert token not in logged and TOKEN not in logged  # ... without the secrets
    assert "token=***" in logged


def test_the_filter_masks_query_values_in_access_and_websocket_lines() -> None:
    access = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s"',
        ("1.2.3.4", "GET", "/x?a=1&token=t.k"),
        None,
    )
    ws = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        "",
        0,
        '%s - "WebSocket %s"',
        ("1.2.3.4", "/x?token=t.k"),
        None,
    )
    for record in (access, ws):
        AccessQueryFilter().filter(record)
    assert access.getMessage() == '1.2.3.4 - "GET /x?a=***&token=***"'
    assert ws.getMessage() == '1.2.3.4 - "WebSocket /x?token=***"'


async def test_cli_client_commands_send_the_api_token(
    secured: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from listenerpool.cli.commands import main

    base = f"http://{secured}"
    async with httpx.AsyncClient(base_url=base) as client:
        await client.put("/v1/sessions/s1", json={"url": URL}, headers=auth(TOKEN))
    monkeypatch.delenv("LP_API_TOKEN", raising=False)
    assert await asyncio.to_thread(main, ["cancel", "s1", "--gateway", base]) == 1
    assert "missing_token" in capsys.readouterr().err
    # The first of the rotated tokens in LP_API_TOKEN is the default.
    monkeypatch.setenv("LP_API_TOKEN", f"{ROTATED},{TOKEN}")
    assert await asyncio.to_thread(main, ["cancel", "s1", "--gateway", base]) == 0
