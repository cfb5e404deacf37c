"""Pipelined script calls (renewal rounds, the reconciler, index writes): one round trip per
pipeline, batched runs of a script on a single server with a reply or an error per call, and a
server that lost its script cache still runs every call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from listenerpool.keys import SessionKeys
from listenerpool.redis_process import RedisServer
from listenerpool.scripts import BATCH_CALLS, Scripts, call_many


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Any]:
    c = aioredis.Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


def report_calls(sids: list[str]) -> list[tuple[list[str], list[str]]]:
    """Reports by the holder of each session's lease (``w:1``)."""
    return [([SessionKeys(s).lease, SessionKeys(s).state], ["w:1", "state", "listening"])
            for s in sids]  # fmt: skip


async def command_calls(client: Any) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_a_pipeline_of_script_calls_asks_nothing_first(client: Any) -> None:
    scripts = Scripts.register(client)
    await scripts.preload(client)
    sids = [f"cm-{n}" for n in range(20)]
    for sid in sids[:10]:
        await client.set(SessionKeys(sid).lease, "w:1")
    await client.config_resetstat()

    replies = await call_many(client, scripts.report, report_calls(sids))

    assert replies == [1] * 10 + [0] * 10
    calls = await command_calls(client)
    assert calls.get("evalsha") == 1  # the twenty calls in one run of the batched script
    assert "script|exists" not in calls, calls  # no round trip before the pipeline
    assert "script|load" not in calls, calls


async def test_calls_go_in_batched_runs_each_with_its_own_reply_in_order(client: Any) -> None:
    scripts = Scripts.register(client)
    await scripts.preload(client)
    count = 2 * BATCH_CALLS + 7
    sids = [f"cm-run-{n}" for n in range(count)]
    for sid in sids[::3]:
        await client.set(SessionKeys(sid).lease, "w:1")
    await client.config_resetstat()

    replies = await call_many(client, scripts.report, report_calls(sids))

    assert replies == [1 if n % 3 == 0 else 0 for n in range(count)]
    assert (await command_calls(client)).get("evalsha") == 3  # 50, 50 and 7 calls
    for n, sid in enumerate(sids):
        written = await client.hget(SessionKeys(sid).state, "state")
        assert written == (b"listening" if n % 3 == 0 else None), sid
    assert await call_many(client, scripts.report, report_calls(sids[:1])) == [1]


async def test_a_call_that_fails_in_a_batched_run_fails_alone(client: Any) -> None:
    """As when each call is sent on its own: the error is that call's reply, the calls before
    and after it run, and call_many raises it once every reply is in."""
    scripts = Scripts.register(client)
    await scripts.preload(client)
    sids = [f"cm-err-{n}" for n in range(5)]
    for sid in sids:
        await client.set(SessionKeys(sid).lease, "w:1")
    await client.set(SessionKeys(sids[2]).state, "not a hash")  # HSET meets WRONGTYPE
    settled: dict[int, Any] = {}

    def told(positions: Any, replies: Any) -> None:
        settled.update(zip(positions, replies, strict=True))

    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await call_many(client, scripts.report, report_calls(sids), told)

    assert isinstance(settled.pop(2), redis.exceptions.ResponseError)
    assert settled == {0: 1, 1: 1, 3: 1, 4: 1}
    for sid in sids[:2] + sids[3:]:
        assert await client.hget(SessionKeys(sid).state, "state") == b"listening"


async def test_calls_to_a_server_that_lost_its_scripts_are_loaded_and_sent_again(
    client: Any,
) -> None:
    scripts = Scripts.register(client)
    sids = [f"cm-flushed-{n}" for n in range(5)]
    for sid in sids:
        await client.set(SessionKeys(sid).lease, "w:1")
    await client.script_flush()  # as after a restart, or on a replica just promoted

    assert await call_many(client, scripts.report, report_calls(sids)) == [1] * 5
    for sid in sids:
        assert await client.hget(SessionKeys(sid).state, "state") == b"listening"
