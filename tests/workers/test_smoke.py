from __future__ import annotations

import pytest

from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import BACKENDS, Pool, eventually, running_worker


@pytest.mark.timeout(30)
@BACKENDS
async def test_one_session_publishes_numbered_events(pool: Pool, upstream: SSEUpstream) -> None:
    async with running_worker(pool):
        result = await pool.control.claim("s1", upstream.url("s1"))
        assert result.outcome.value == "created"

        async def has_events() -> bool:
            return len(await pool.stream("s1")) >= 20

        await eventually(has_events, 10, "no events published")
        entries = await pool.stream("s1")
        numbers = [SSEUpstream.number_of(e["data"]) for e in entries]
        assert numbers == list(range(1, len(numbers) + 1))
        assert [int(e["seq"]) for e in entries] == list(range(1, len(entries) + 1))
        state = (await pool.states(["s1"]))["s1"]
        assert state["state"] == "listening"
        assert state["owner"] == "w-inproc"
