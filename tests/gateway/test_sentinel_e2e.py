"""The pool behind Redis Sentinel: ``LP_REDIS_URL=redis+sentinel://...``, the primary SIGKILLed
while sessions stream to WebSocket and SSE clients; the Sentinels promote the replica and the
gateway and worker processes follow them there by themselves."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from listenerpool.tasks import cancel_until_done
from listenerpool.testing.harness.redis_sentinel import RedisSentinels
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import GatewayProcesses, Pool, WorkerProcesses, eventually
from tests.gateway.test_gateway_e2e import (
    Received,
    follow,
    http_client,
    put_session,
    run_clients,
    start_gateways,
    start_workers,
    wait_head,
)

RATE = 100
TOTAL = 700
# The streams hold here until the primary is replaced, so events always follow the failover
# however long the Sentinels take over it.
BEFORE_KILL = 300


@pytest.fixture
def sentinels() -> Iterator[RedisSentinels]:
    with RedisSentinels() as group:
        yield group


@pytest.mark.timeout(120)
async def test_sessions_keep_delivering_after_the_primary_is_killed(
    sentinels: RedisSentinels,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    sids = ["sen-a", "sen-b", "sen-c"]
    pool = Pool(sentinels.url)
    try:
        with SSEUpstream(rate=RATE, total=BEFORE_KILL, heartbeat=0.5) as upstream:
            start_workers(worker_processes, sentinels.url, 1)
            [base] = await start_gateways(
                gateway_processes, sentinels.url, 1, stream_check_interval=600
            )
            async with http_client() as client:
                for sid in sids:
                    resp = await put_session(client, base, sid, upstream.url(sid))
                    assert resp.status_code == 201, resp.text
            received, jobs = [], []
            for sid in sids:
                for kind in ("ws", "sse"):
                    rec = Received(kind, 0)
                    received.append(rec)
                    jobs.append(follow(kind, base, sid, TOTAL, rec=rec))
            clients = asyncio.create_task(run_clients(jobs, received, 90))
            try:
                for sid in sids:
                    await wait_head(pool, sid, 100, 20)
                # Every client streams before the kill: one whose first request came during
                # the failover would rightly be answered 503 (Redis unavailable).
                await eventually(
                    lambda: all(rec.seqs for rec in received), 30, "clients not streaming"
                )
                old = sentinels.primary_port()
                new = await asyncio.to_thread(sentinels.kill_primary)
                assert new != old
                for sid in sids:
                    upstream.configure(sid, total=TOTAL)
                await clients
            finally:
                await cancel_until_done(clients)
            for rec in received:
                rec.assert_consecutive(until=TOTAL)
                assert rec.connects == 1, rec.summary()
            for sid in sids:
                assert upstream.stats(sid).max_concurrent == 1, f"{sid}: two readers at once"
    finally:
        await pool.aclose()
