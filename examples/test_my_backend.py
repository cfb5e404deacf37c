"""How a backend tests its own code against listenerpool with the pytest plugin's fixtures.

``RunService`` stands for a backend's code: it starts listening to an agent run's event stream
through the pool and reads the run's transcript back. The tests script the runner with
``lp_upstream`` and run everything against ``lp_pool``: a real gateway and worker in the test
process, on fakeredis; no Redis server, no network beyond loopback.

Run with ``pytest examples/`` once ``listenerpool[testing]`` is installed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_asyncio

from listenerpool.client import Event, PoolClient
from listenerpool.testing.pool import LocalPool
from listenerpool.testing.upstream import SSEUpstream


# -- the backend's code under test -------------------------------------------------------------
class RunService:
    """Starts listening to agent runs and assembles their text."""

    def __init__(self, pool: PoolClient, runner_token: str) -> None:
        self._pool = pool
        self._token = runner_token

    async def start_run(self, run_id: str, runner_url: str) -> None:
        await self._pool.start(
            f"run-{run_id}", runner_url, {"Authorization": f"Bearer {self._token}"}
        )

    async def transcript(self, run_id: str) -> str:
        """The assistant's text, from the first event up to RUN_FINISHED."""
        text = []
        async with self._pool.events(f"run-{run_id}", after=0) as stream:
            async for item in stream:
                if not isinstance(item, Event):
                    continue
                if item.event == "TEXT_MESSAGE_CONTENT":
                    text.append(json.loads(item.data)["delta"])
                elif item.event == "RUN_FINISHED":
                    break
        return "".join(text)

    async def state(self, run_id: str) -> str:
        status: dict[str, Any] = await self._pool.status(f"run-{run_id}")
        return str(status["state"])


# -- its tests ---------------------------------------------------------------------------------
@pytest_asyncio.fixture
async def service(lp_pool: LocalPool) -> Any:
    async with lp_pool.client() as client:
        yield RunService(client, runner_token="t0ken")


def script_run(upstream: SSEUpstream, sid: str, words: list[str]) -> None:
    upstream.send(sid, json.dumps({"type": "RUN_STARTED"}), event="RUN_STARTED", id="1")
    for n, word in enumerate(words, start=2):
        delta = json.dumps({"delta": word})
        upstream.send(sid, delta, event="TEXT_MESSAGE_CONTENT", id=str(n))
    done = json.dumps({"type": "RUN_FINISHED"})
    upstream.send(sid, done, event="RUN_FINISHED", id=str(len(words) + 2))


@pytest.mark.asyncio
async def test_transcript_is_assembled_from_the_runner_events(
    service: RunService, lp_upstream: SSEUpstream
) -> None:
    script_run(lp_upstream, "run-7", ["Hel", "lo", ", world"])
    await service.start_run("7", lp_upstream.url("run-7"))
    assert await service.transcript("7") == "Hello, world"
    # The runner saw the backend's credentials on the pool's request.
    headers = lp_upstream.stats("run-7").request_headers[0]
    assert headers["authorization"] == "Bearer t0ken"


@pytest.mark.asyncio
async def test_a_runner_restart_mid_run_loses_nothing(
    service: RunService, lp_pool: LocalPool, lp_upstream: SSEUpstream
) -> None:
    sid = "run-8"
    lp_upstream.send(sid, json.dumps({"delta": "one "}), event="TEXT_MESSAGE_CONTENT", id="1")
    await service.start_run("8", lp_upstream.url(sid))
    first = await lp_pool.wait_for_events(sid, 1)
    assert first[0].data == '{"delta": "one "}'

    lp_upstream.close(sid)  # the runner drops the stream; the pool reconnects by itself
    lp_upstream.send(sid, json.dumps({"delta": "two"}), event="TEXT_MESSAGE_CONTENT", id="2")
    lp_upstream.send(sid, "{}", event="RUN_FINISHED", id="3")
    assert await service.transcript("8") == "one two"
    assert lp_upstream.stats(sid).last_event_ids[-1] == "1"  # it resumed after event 1


@pytest.mark.asyncio
async def test_a_runner_that_refuses_the_run_is_reported_failed(
    service: RunService, lp_pool: LocalPool, lp_upstream: SSEUpstream
) -> None:
    lp_upstream.fail("run-9", 404)
    await service.start_run("9", lp_upstream.url("run-9"))
    status = await lp_pool.wait_for_state("run-9", "failed")
    assert "404" in status["last_error"]
    assert await service.state("9") == "failed"
