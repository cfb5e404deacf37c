"""The gateway app in-process on fakeredis: the control API's contract, and mounting it inside
another application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway import create_app
from tests.conftest import fast_settings
from tests.gateway.served import in_process

pytestmark = pytest.mark.timeout(30)
URL = "http://127.0.0.1:9/events/s1"


@pytest.fixture
async def client(fake_redis: Any, fake_sync_redis: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = fast_settings(redis_url="redis://unused")
    async with in_process(settings, fake_redis, fake_sync_redis) as c:
        yield c


async def test_put_is_idempotent_and_get_reports_the_session(client: httpx.AsyncClient) -> None:
    first = await client.put("/v1/sessions/s1", json={"url": URL})
    assert first.status_code == 201
    assert first.json() == {"sid": "s1", "outcome": "created", "epoch": 1}
    again = await client.put("/v1/sessions/s1", json={"url": URL})
    assert (again.status_code, again.json()["outcome"]) == (200, "unchanged")
    status = (await client.get("/v1/sessions/s1")).json()
    assert (status["sid"], status["url"], status["state"], status["desired"]) == (
        "s1", URL, "pending", True,
    )  # fmt: skip
    listing = (await client.get("/v1/sessions")).json()
    assert [s["sid"] for s in listing["sessions"]] == ["s1"]
    assert listing["next_offset"] is None


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/sessions/bad%20id", {"url": URL}, 400, "invalid_session_id"),
        ("/v1/sessions/" + "x" * 129, {"url": URL}, 400, "invalid_session_id"),
        ("/v1/sessions/s2", {"url": "ftp://host/x"}, 400, "invalid_upstream"),
        (
            "/v1/sessions/s2",
            {"url": URL, "headers": {"Last-Event-ID": "1"}},
            400,
            "invalid_upstream",
        ),
        ("/v1/sessions/s2", {"headers": {}}, 400, "invalid_request"),
        ("/v1/sessions/s2", {"url": URL, "headers": {"a": 1}}, 400, "invalid_request"),
    ],
)
async def test_bad_input_gets_a_json_4xx(
    client: httpx.AsyncClient, path: str, body: Any, status: int, code: str
) -> None:
    response = await client.put(path, json=body)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


async def test_oversized_and_malformed_bodies(client: httpx.AsyncClient) -> None:
    big = await client.put("/v1/sessions/s3", content=b"{" + b" " * 70_000 + b"}")
    assert (big.status_code, big.json()["error"]["code"]) == (413, "body_too_large")
    broken = await client.put(
        "/v1/sessions/s3", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert (broken.status_code, broken.json()["error"]["code"]) == (400, "invalid_request")


async def test_unknown_sessions_are_404(client: httpx.AsyncClient) -> None:
    for method in ("GET", "DELETE"):
        response = await client.request(method, "/v1/sessions/nobody")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_session"
    events = await client.get("/v1/sessions/nobody/events")
    assert events.status_code == 404


async def test_delete_cancels(client: httpx.AsyncClient) -> None:
    await client.put("/v1/sessions/s4", json={"url": URL})
    response = await client.delete("/v1/sessions/s4")
    assert response.status_code == 202
    assert (await client.get("/v1/sessions/s4")).json()["state"] == "stopped"


async def test_health_readiness_and_schema(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    schema = (await client.get("/v1/openapi.json")).json()
    assert "/v1/sessions/{sid}" in schema["paths"]


async def test_mounted_inside_another_app(fake_redis: Any, fake_sync_redis: Any) -> None:
    pool_app = create_app(
        fast_settings(redis_url="redis://unused"), redis=fake_redis, sync=fake_sync_redis
    )

    @asynccontextmanager
    async def host_lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pool_app.router.lifespan_context(pool_app):
            yield

    host = FastAPI(lifespan=host_lifespan)
    host.mount("/pool", pool_app)

    @host.get("/own")
    async def own() -> dict[str, str]:
        return {"host": "yes"}

    async with host.router.lifespan_context(host):
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://host") as c:
            assert (await c.get("/own")).json() == {"host": "yes"}
            created = await c.put("/pool/v1/sessions/m1", json={"url": URL})
            assert created.status_code == 201
            assert (await c.get("/pool/v1/sessions/m1")).json()["sid"] == "m1"


async def test_405_lists_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/sessions/s1")
    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"
    assert set(resp.headers["allow"].split(", ")) == {"DELETE", "GET", "PUT"}


async def test_a_huge_list_offset_is_a_400_not_a_redis_error(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/sessions", params={"offset": 10**22})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_request"


async def test_the_schema_documents_the_error_answers(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/v1/openapi.json")).json()
    put = schema["paths"]["/v1/sessions/{sid}"]["put"]["responses"]
    assert {"200", "201", "400", "403", "413", "429", "503"} <= set(put)
    assert "422" not in put  # validation failures are answered with 400
    error = put["403"]["content"]["application/json"]["schema"]["$ref"]
    assert error == "#/components/schemas/ErrorBody"


async def test_the_schema_documents_the_multiplexed_stream(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/v1/openapi.json")).json()
    stream = schema["paths"]["/v1/stream"]["get"]
    params = {(p["in"], p["name"]) for p in stream["parameters"]}
    assert params == {("query", "sessions"), ("query", "token"), ("header", "Last-Event-ID")}
    assert {"200", "400", "401", "503"} <= set(stream["responses"])
    assert "WebSocket" in stream["description"]
    token = schema["paths"]["/v1/subscribe-token"]["post"]
    assert {"201", "400", "401", "404", "409"} <= set(token["responses"])
    frames = schema["components"]["schemas"]
    assert set(frames["StreamEventFrame"]["properties"]) == {
        "sid",
        "seq",
        "epoch",
        "event",
        "data",
        "id",
    }
    ops = frames["StreamControlFrame"]["properties"]["op"]["enum"]
    assert ops == ["subscribed", "unsubscribed", "reset", "error"]
    assert frames["SubscribeFrame"]["properties"]["op"]["const"] == "subscribe"
    assert frames["UnsubscribeFrame"]["properties"]["op"]["const"] == "unsubscribe"


async def test_each_app_serves_its_own_metrics(fake_redis: Any, fake_sync_redis: Any) -> None:
    settings = fast_settings(redis_url="redis://unused")
    apps = [create_app(settings, redis=fake_redis, sync=fake_sync_redis) for _ in range(2)]
    texts = []
    for app in apps:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                await c.put("/v1/sessions/s5", json={"url": URL})
                await c.get("/v1/sessions/s5/events?after=bad")  # a 400, not a Redis error
                response = await c.get("/metrics")
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain")
                assert "/metrics" not in (await c.get("/v1/openapi.json")).json()["paths"]
                texts.append(response.text)
    for text in texts:
        assert 'listenerpool_clients_connected{transport="ws"} 0.0' in text
        assert 'listenerpool_redis_errors_total{operation="api"} 0.0' in text
    assert apps[0].state.metrics.registry is not apps[1].state.metrics.registry
