"""A worker's metrics and status port, in-process on a private redis-server: reconnect reasons,
listener states, renewal failures and self-fences, /readyz."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from listenerpool.metrics import ReconnectReason
from listenerpool.testing.redis_server import RedisServer, free_port
from listenerpool.testing.tcpproxy import TCPProxy
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker
from workers.status_server import StatusServer
from workers.worker import Worker

pytestmark = pytest.mark.timeout(60)

# What follows a cut from Redis (a failed renewal, a self-fence, a drain giving up) is timed by
# the lease: a few TTLs is a deadline a loaded machine meets, and says nothing of speed.
LEASE_TTLS = 5


def sample(worker: Worker, name: str, **labels: str) -> float:
    value = worker.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def reconnects(worker: Worker, reason: ReconnectReason) -> float:
    return sample(worker, "listenerpool_upstream_reconnects_total", reason=reason.value)


async def test_reconnects_are_counted_by_reason_and_listeners_by_state(
    pool: Pool, upstream: SSEUpstream
) -> None:
    closed_port = free_port()  # nothing listens there
    upstream.configure("r-status", mode="status:503")
    upstream.configure("r-garbage", mode="garbage")
    async with running_worker(pool, idle_timeout=1.0) as worker:
        await pool.control.claim("r-ok", upstream.url("r-ok"))
        await pool.control.claim("r-status", upstream.url("r-status"))
        await pool.control.claim("r-garbage", upstream.url("r-garbage"))
        await pool.control.claim("r-refused", f"http://127.0.0.1:{closed_port}/events/r")
        await pool.control.claim("r-stall", upstream.url("r-stall"))
        await eventually(lambda: worker.load == 5, 10, "not all sessions adopted")
        await eventually(lambda: upstream.stats("r-stall").highest_emitted >= 3, 10)
        upstream.configure("r-stall", mode="stall")
        await eventually(lambda: upstream.stats("r-ok").highest_emitted >= 5, 10)
        upstream.drop("r-ok")  # a clean end of stream

        expected = {
            ReconnectReason.HTTP_STATUS: "r-status",
            ReconnectReason.PROTOCOL_ERROR: "r-garbage",
            ReconnectReason.CONNECT_ERROR: "r-refused",
            ReconnectReason.IDLE_TIMEOUT: "r-stall",
            ReconnectReason.EOF: "r-ok",
        }
        for reason, sid in expected.items():
            await eventually(
                lambda reason=reason: reconnects(worker, reason) >= 1,  # type: ignore[misc]
                15,
                f"{sid}: no reconnect counted as {reason.value}",
            )
        assert reconnects(worker, ReconnectReason.REDIS_ERROR) == 0
        assert sample(worker, "listenerpool_backoff_seconds_total") > 0

        upstream.reset("r-stall")
        upstream.reset("r-status")

        async def states() -> bool:
            return (
                sample(worker, "listenerpool_listeners", state="listening") >= 3
                and sample(worker, "listenerpool_listeners", state="backoff")
                + sample(worker, "listenerpool_listeners", state="connecting")
                + sample(worker, "listenerpool_listeners", state="listening")
                == 5
            )

        await eventually(states, 10, "listener states do not add up")
        # With every stream stalled, each stored event was counted once, no more.
        sids = ["r-ok", "r-status", "r-garbage", "r-refused", "r-stall"]
        for sid in sids:
            upstream.configure(sid, mode="stall")

        async def counted() -> bool:
            stored = sum([len(await pool.stream(sid)) for sid in sids])
            return stored > 0 and sample(worker, "listenerpool_events_published_total") == stored

        await eventually(counted, 10, "published counter differs from the events stored")


async def test_a_cut_off_worker_counts_failed_renewals_and_self_fences_and_turns_unready(
    redis_server: RedisServer, upstream: SSEUpstream
) -> None:
    with TCPProxy(redis_server.port) as proxy:
        pool = Pool(f"redis://127.0.0.1:{proxy.port}/0")
        direct = Pool(redis_server.url)
        try:
            async with running_worker(pool) as worker:
                with StatusServer(
                    worker.metrics.registry, worker.healthy, "127.0.0.1", 0
                ) as status:
                    base = f"http://127.0.0.1:{status.port}"
                    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
                        await direct.control.claim("cut1", upstream.url("cut1"))
                        await eventually(lambda: worker.load == 1, 10, "not adopted")

                        async def ready(expected: int) -> bool:
                            return (await http.get("/readyz")).status_code == expected

                        await eventually(lambda: ready(200), 10, "never ready")
                        metrics = await http.get("/metrics")
                        assert "listenerpool_listeners" in metrics.text
                        assert (await http.get("/healthz")).json() == {"status": "ok"}
                        assert (await http.get("/nope")).status_code == 404

                        proxy.set_mode("stall")
                        deadline = LEASE_TTLS * pool.settings.lease_ttl
                        await eventually(
                            lambda: sample(worker, "listenerpool_self_fences_total") == 1,
                            deadline,
                            "no self-fence counted",
                        )
                        # The stalled round fails when the clocks it would confirm run out,
                        # about when the reader fences.
                        await eventually(
                            lambda: sample(worker, "listenerpool_lease_renew_failures_total") >= 1,
                            deadline,
                            "no failed renewal counted",
                        )
                        assert sample(worker, "listenerpool_redis_errors_total", operation="renew")
                        await eventually(lambda: ready(503), deadline, "still ready")
                        body = (await http.get("/readyz")).json()
                        assert body["error"]["code"] == "not_ready"
                        proxy.set_mode("pass")
                        await eventually(lambda: ready(200), 10, "not ready after Redis is back")
        finally:
            await pool.aclose()
            await direct.aclose()


async def test_a_worker_cut_off_from_redis_still_drains_and_exits(
    redis_server: RedisServer, upstream: SSEUpstream
) -> None:
    """Asked to stop while Redis cannot be reached, the worker cannot hand its leases back;
    it must still stop its readers and exit (the leases lapse on their own)."""
    with TCPProxy(redis_server.port) as proxy:
        pool = Pool(f"redis://127.0.0.1:{proxy.port}/0")
        direct = Pool(redis_server.url)
        try:
            worker = Worker(pool.settings, redis=pool.redis, queue=pool.queue, worker_id="w-cut")
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop))
            await eventually(worker.ready.is_set, 10, "worker did not start")
            await direct.control.claim("cutdrain", upstream.url("cutdrain"))
            await eventually(lambda: worker.load == 1, 10, "not adopted")
            proxy.set_mode("stall")
            stop.set()
            # The job feed and the hand-over each give up after a ttl (so a few of those for
            # both); blocked on Redis, the drain would never end.
            exit_deadline = 2 * LEASE_TTLS * pool.settings.lease_ttl
            done, _ = await asyncio.wait([task], timeout=exit_deadline)
            assert done, "the worker did not exit while cut off from Redis"
            await eventually(lambda: upstream.stats("cutdrain").concurrent == 0, 10,
                             "the reader's upstream connection is still open")  # fmt: skip
        finally:
            proxy.set_mode("pass")
            await pool.aclose()
            await direct.aclose()
