"""The pytest plugin's in-process pool, used through its own fixtures (the plugin is active in
this suite as in any other where listenerpool is installed)."""

from __future__ import annotations

from typing import Any

import pytest

from listenerpool.testing.pool import LocalPool
from listenerpool.testing.upstream import SSEUpstream

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def lp_settings() -> dict[str, Any]:
    return {"history_maxlen": 50, "worker_id": "local-w"}


async def test_settings_override_and_the_waiting_helpers(
    lp_pool: LocalPool, lp_upstream: SSEUpstream
) -> None:
    assert lp_pool.settings is not None
    assert lp_pool.settings.history_maxlen == 50
    assert lp_pool.settings.redis_url != "redis://127.0.0.1:6379/0"
    async with lp_pool.client() as client:
        workers = (await client.workers())["workers"]
        assert [w["id"] for w in workers] == ["local-w"]
        await client.start("p1", lp_upstream.url("p1"))
        status = await lp_pool.wait_for_state("p1", "listening")
        assert status["owner"] == "local-w"
        for n in range(1, 4):
            lp_upstream.send("p1", f"payload {n}", event="E", id=str(n))
        events = await lp_pool.wait_for_events("p1", 3)
        assert [(e.seq, e.data, e.id) for e in events] == [
            (1, "payload 1", "1"), (2, "payload 2", "2"), (3, "payload 3", "3"),
        ]  # fmt: skip


async def test_waiting_in_vain_fails_with_what_was_seen(
    lp_pool: LocalPool, lp_upstream: SSEUpstream
) -> None:
    async with lp_pool.client() as client:
        await client.start("p2", lp_upstream.url("p2"))
    lp_upstream.send("p2", "only one")
    with pytest.raises(AssertionError, match=r"1 of 2 events after 0.5s"):
        await lp_pool.wait_for_events("p2", 2, timeout=0.5)
    with pytest.raises(AssertionError, match=r"not in state \['failed'\] after 0.3s"):
        await lp_pool.wait_for_state("p2", "failed", timeout=0.3)


def test_a_stopped_pool_can_be_stopped_again_and_has_no_url() -> None:
    pool = LocalPool()
    with pytest.raises(RuntimeError, match="not started"):
        pool.url  # noqa: B018
    pool.start()
    url = pool.url
    pool.stop()
    pool.stop()
    assert url.startswith("http://127.0.0.1:")
