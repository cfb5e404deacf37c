"""PUT /v1/sessions: many sessions claimed in one request, checked as a whole first, and
PoolClient.start_many splitting a long list into requests the gateway takes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from listenerpool.client import PoolClient, PoolClientError
from listenerpool.keys import SessionKeys
from tests.conftest import fast_settings
from tests.gateway.served import gateway, in_process

pytestmark = pytest.mark.timeout(30)


def url(sid: str) -> str:
    return f"http://127.0.0.1:9/events/{sid}"


@pytest.fixture
async def client(
    fake_redis: Any, fake_sync_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("LP_MAX_BATCH", "5")
    settings = fast_settings(redis_url="redis://unused")
    async with in_process(settings, fake_redis, fake_sync_redis) as c:
        yield c


def batch(*items: tuple[str, str]) -> dict[str, Any]:
    return {"sessions": [{"sid": sid, "url": u} for sid, u in items]}


async def test_one_request_claims_many_and_repeating_it_changes_nothing(
    client: httpx.AsyncClient, fake_sync_redis: Any
) -> None:
    body = batch(*((f"b{i}", url(f"b{i}")) for i in range(4)))
    first = await client.put("/v1/sessions", json=body)
    assert first.status_code == 200
    assert first.json() == {
        "results": [{"sid": f"b{i}", "outcome": "created", "epoch": 1} for i in range(4)]
    }
    assert fake_sync_redis.llen("{rq}:queue:lp-listen") == 4  # one listen job each
    again = await client.put("/v1/sessions", json=body)
    assert [r["outcome"] for r in again.json()["results"]] == ["unchanged"] * 4
    assert fake_sync_redis.llen("{rq}:queue:lp-listen") == 4
    # A mix: a changed URL, a new session, an unchanged one; each answered in place.
    mixed = batch(("b0", url("moved")), ("b9", url("b9")), ("b1", url("b1")))
    answer = (await client.put("/v1/sessions", json=mixed)).json()["results"]
    assert [(r["sid"], r["outcome"]) for r in answer] == [
        ("b0", "updated"),  # its queued job's reader will connect to the new URL
        ("b9", "created"),
        ("b1", "unchanged"),
    ]
    status = (await client.get("/v1/sessions/b0")).json()
    assert status["url"] == url("moved")


@pytest.mark.parametrize(
    ("sessions", "status", "code", "named"),
    [
        ([("ok1", url("ok1")), ("bad id", url("x"))], 400, "invalid_session_id", "sessions[1]"),
        ([("ok1", url("ok1")), ("s2", "ftp://host/x")], 400, "invalid_upstream", "sessions[1]"),
        ([("ok1", url("ok1")), ("s3", "http://169.254.169.254/x")], 403, "upstream_not_allowed",
         "sessions[1]"),
        ([("ok1", url("ok1")), ("ok1", url("ok1"))], 400, "invalid_session_id", "named twice"),
        ([(f"n{i}", url("n")) for i in range(6)], 400, "too_many_sessions", "LP_MAX_BATCH"),
        ([], 400, "invalid_request", "sessions"),
    ],
)  # fmt: skip
async def test_one_bad_entry_refuses_the_whole_batch(
    client: httpx.AsyncClient,
    fake_redis: Any,
    sessions: list[tuple[str, str]],
    status: int,
    code: str,
    named: str,
) -> None:
    response = await client.put("/v1/sessions", json=batch(*sessions))
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert named in error["message"]
    assert not await fake_redis.exists(SessionKeys("ok1").spec)  # nothing was claimed


async def test_the_schema_documents_the_batch_route(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/v1/openapi.json")).json()
    put = schema["paths"]["/v1/sessions"]["put"]
    assert {"200", "400", "403", "413", "429", "503"} <= set(put["responses"])
    assert "422" not in put["responses"]


async def test_start_many_splits_a_long_list_into_requests_the_gateway_takes(
    fake_redis: Any, fake_sync_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LP_MAX_BATCH", "5")
    settings = fast_settings(redis_url="redis://unused")
    sessions = [{"sid": f"m{i}", "url": url(f"m{i}")} for i in range(12)]
    async with (
        gateway(settings, fake_redis, fake_sync_redis) as address,
        PoolClient(f"http://{address}") as pool,
    ):
        results = await pool.start_many(sessions, per_request=5)
        assert [(r["sid"], r["outcome"]) for r in results] == [
            (f"m{i}", "created") for i in range(12)
        ]
        with pytest.raises(PoolClientError) as refused:
            await pool.start_many(sessions, per_request=6)  # over the gateway's LP_MAX_BATCH
        assert (refused.value.status, refused.value.code) == (400, "too_many_sessions")
        with pytest.raises(ValueError):
            await pool.start_many(sessions, per_request=0)
