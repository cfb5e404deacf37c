"""The pool on a real Redis Cluster (3 primaries, 3 replicas, all on loopback) while the cluster
changes under it: a manual failover, a primary SIGKILLed, hash slots of live sessions moved to
another primary. Gateway and worker processes, WebSocket and SSE clients, the scripted upstream.

Judged from outside: every client gets seq 1..N once each, in order, on one connection; the
upstream never sees two concurrent readers of a session; the gateway holds one subscription
connection per primary, not one per session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from redis.crc import key_slot

from listenerpool.keys import SessionKeys
from listenerpool.tasks import cancel_until_done
from listenerpool.testing.harness.redis_cluster import RedisClusterNodes
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

RATE = 100  # events/s per session
TOTAL = 900  # events per session
# The streams are let out in steps (Run.let_out): each fault lands mid-stream with events
# still to come however long the machine takes over the faults, and no stream ends early.
FIRST_STEP = 300


@pytest.fixture
def cluster() -> Iterator[RedisClusterNodes]:
    """A private cluster: these tests kill and reshape it."""
    with RedisClusterNodes(node_timeout_ms=1000) as nodes:
        yield nodes


def slot_of(sid: str) -> int:
    return key_slot(SessionKeys(sid).spec.encode())


def sessions_on_every_primary(cluster: RedisClusterNodes, per_primary: int) -> dict[int, list[str]]:
    """Session ids whose keys live on each primary, ``per_primary`` each."""
    wanted = {port: [] for port in cluster.primary_ports()}  # type: dict[int, list[str]]
    i = 0
    while any(len(sids) < per_primary for sids in wanted.values()):
        sid = f"c{i}"
        i += 1
        owner = cluster.owner(slot_of(sid))
        if len(wanted[owner]) < per_primary:
            wanted[owner].append(sid)
    return wanted


def gateway_subscriptions(cluster: RedisClusterNodes, gateway_pid: int) -> dict[int, int]:
    """Per node: how many connections of the gateway process hold sharded subscriptions."""
    local_ports = {
        c.laddr.port
        for c in psutil.Process(gateway_pid).net_connections("tcp")
        if c.raddr and c.raddr.port in cluster.servers
    }
    found: dict[int, int] = {}
    for port in cluster.alive():
        with cluster.client(port) as client:
            for info in client.client_list():
                mine = int(info["addr"].rsplit(":", 1)[1]) in local_ports
                if mine and int(info.get("ssub", 0)) > 0:
                    found[port] = found.get(port, 0) + 1
    return found


class Run:
    """Sessions on every primary, a WS and an SSE client for each, running in the background."""

    def __init__(self, cluster: RedisClusterNodes, upstream: SSEUpstream, base: str) -> None:
        self.cluster = cluster
        self.upstream = upstream
        self.base = base
        self.by_primary = sessions_on_every_primary(cluster, 2)
        self.sids = [sid for sids in self.by_primary.values() for sid in sids]
        self.received: list[Received] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async with http_client() as client:
            for sid in self.sids:
                self.upstream.configure(sid, rate=RATE, total=FIRST_STEP)
                resp = await put_session(client, self.base, sid, self.upstream.url(sid))
                assert resp.status_code == 201, resp.text
        jobs = []
        for sid in self.sids:
            for kind in ("ws", "sse"):
                rec = Received(kind, 0)
                self.received.append(rec)
                jobs.append(follow(kind, self.base, sid, TOTAL, rec=rec))
        self.task = asyncio.create_task(run_clients(jobs, self.received, 90))

    def let_out(self, total: int) -> None:
        """Let every session's stream run on up to event ``total`` (at most TOTAL)."""
        for sid in self.sids:
            self.upstream.configure(sid, total=min(total, TOTAL))

    async def finish(self) -> None:
        assert self.task is not None
        self.let_out(TOTAL)
        await self.task
        for rec in self.received:
            rec.assert_consecutive(until=TOTAL)
            assert rec.connects == 1, f"a client was cut off: {rec.summary()}"
        for sid in self.sids:
            stats = self.upstream.stats(sid)
            assert stats.max_concurrent == 1, f"{sid}: two readers at once"
            assert stats.highest_emitted == TOTAL

    async def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            await cancel_until_done(self.task)


async def started(
    cluster: RedisClusterNodes,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> tuple[Run, Pool, Any]:
    start_workers(worker_processes, cluster.url, 2)
    # Only the subscriptions' own recovery may fill what clients miss, not the periodic check.
    [base] = await start_gateways(
        gateway_processes, cluster.url, 1, stream_check_interval=600, log_level="INFO"
    )
    run = Run(cluster, upstream, base)
    pool = Pool(cluster.url)
    await run.start()
    for sid in run.sids:
        await wait_head(pool, sid, 50, 20)
    return run, pool, gateway_processes.procs[-1]


@pytest.fixture
def upstream() -> Iterator[SSEUpstream]:
    with SSEUpstream(rate=RATE, heartbeat=0.5) as server:
        yield server


@pytest.mark.timeout(150)
async def test_sessions_on_every_shard_survive_a_failover_and_a_killed_primary(
    cluster: RedisClusterNodes,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    run, pool, gateway = await started(cluster, upstream, gateway_processes, worker_processes)
    try:
        primaries = cluster.primary_ports()
        assert all(len(run.by_primary[p]) == 2 for p in primaries), "sessions on every shard"
        # One subscription connection per primary, whatever the number of sessions.
        await eventually(
            lambda: gateway_subscriptions(cluster, gateway.pid) == dict.fromkeys(primaries, 1),
            10,
            "the gateway does not hold one subscription connection per primary",
        )

        # (a) a manual failover: the primary becomes a replica of its former replica.
        first = primaries[0]
        promoted = await asyncio.to_thread(cluster.failover, first)
        heads = {
            sid: int(await pool.redis.hget(SessionKeys(sid).state, "seq") or 0)
            for sid in run.by_primary[first]
        }
        run.let_out(FIRST_STEP + 200)
        for sid, head in heads.items():
            await wait_head(pool, sid, head + 100, 20)  # still flowing, now on `promoted`

        # ... then a primary SIGKILLed: its replica is promoted by the cluster.
        second = primaries[1]
        run.let_out(TOTAL)
        await asyncio.to_thread(cluster.kill, second)
        await run.finish()
        assert promoted in cluster.primary_ports()
    finally:
        await run.cancel()
        await pool.aclose()


@pytest.mark.timeout(150)
async def test_live_sessions_keep_delivering_while_their_slots_move(
    cluster: RedisClusterNodes,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    run, pool, _ = await started(cluster, upstream, gateway_processes, worker_processes)
    try:
        primaries = cluster.primary_ports()
        moves = []
        for source in primaries:
            target = primaries[(primaries.index(source) + 1) % len(primaries)]
            for sid in run.by_primary[source]:
                moves.append((sid, target))
        step = (TOTAL - FIRST_STEP) // len(moves)
        for n, (sid, target) in enumerate(moves, start=1):
            head = int(await pool.redis.hget(SessionKeys(sid).state, "seq") or 0)
            run.let_out(FIRST_STEP + n * step)
            moved = await asyncio.to_thread(cluster.move_slot, slot_of(sid), target)
            assert moved >= 4, f"{sid}: only {moved} keys moved"
            assert cluster.owner(slot_of(sid)) == target
            await wait_head(pool, sid, head + 20, 20)
        await run.finish()
        assert "moved away" in gateway_processes.log("gw0"), "no subscription followed a slot"
    finally:
        await run.cancel()
        await pool.aclose()


@pytest.mark.timeout(90)
async def test_listen_jobs_still_run_after_rqs_primary_fails_over(
    cluster: RedisClusterNodes,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    start_workers(worker_processes, cluster.url, 1)
    [base] = await start_gateways(gateway_processes, cluster.url, 1)
    rq_primary = cluster.owner(key_slot(b"{rq}"))
    async with http_client() as client:
        resp = await put_session(client, base, "before", upstream.url("before"))
        assert resp.status_code == 201
        await wait_listening(client, base, "before")

        await asyncio.to_thread(cluster.kill, rq_primary)

        # The gateway's enqueue and the worker's dequeue reach the promoted replica.
        async def started_after() -> bool:
            resp = await put_session(client, base, "after", upstream.url("after"))
            return resp.status_code in (200, 201)

        await eventually(started_after, 20, "PUT kept failing after the failover")
        await wait_listening(client, base, "after")
    assert upstream.stats("after").connections_total >= 1


async def wait_listening(client: httpx.AsyncClient, base: str, sid: str) -> None:
    async def listening() -> bool:
        resp = await client.get(f"{base}/v1/sessions/{sid}")
        return resp.status_code == 200 and resp.json()["state"] == "listening"

    await eventually(listening, 30, f"{sid} never started listening")
