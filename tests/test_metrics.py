"""Prometheus metrics of real processes: a gateway, two workers with their metrics ports, the test
upstream and a private redis-server. Counters must move as events flow and when a worker dies."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from listenerpool.client import Event, PoolClient
from listenerpool.metrics import ReconnectReason
from listenerpool.tasks import cancel_until_done
from listenerpool.testing.redis_server import free_port
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import GatewayProcesses, Pool, WorkerProcesses, eventually
from tests.workers.test_failover import wait_listening, wait_registered

pytestmark = pytest.mark.timeout(90)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: httpx.AsyncClient, base: str) -> Samples:
    """Every sample of ``base``/metrics, keyed by name and sorted labels."""
    response = await http.get(base + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def follow_ws(client: PoolClient, sid: str, seen: list[int]) -> None:
    async for item in client.events(sid, after=0):
        if isinstance(item, Event):
            seen.append(item.seq)


async def follow_sse(http: httpx.AsyncClient, base: str, sid: str, seen: list[int]) -> None:
    async with http.stream("GET", f"{base}/v1/sessions/{sid}/events?after=0") as response:
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                seen.append(int(line[4:]))


@contextlib.asynccontextmanager
async def background(*coros: object) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.ensure_future(c) for c in coros]  # type: ignore[arg-type]
    try:
        yield tasks
    finally:
        for task in tasks:
            await cancel_until_done(task)


async def test_counters_move_with_events_and_with_a_failover(
    redis_url: str,
    upstream: SSEUpstream,
    worker_processes: WorkerProcesses,
    gateway_processes: GatewayProcesses,
) -> None:
    sids = ["m1", "m2", "m3"]
    ports = {"ma": free_port(), "mb": free_port()}
    pool = Pool(redis_url)
    http = httpx.AsyncClient(timeout=5)
    try:
        victim = worker_processes.start(redis_url, "ma", metrics_port=ports["ma"])
        _, gateway = gateway_processes.start(redis_url, "mg")
        for sid in sids:
            await pool.control.claim(sid, upstream.url(sid))
        await wait_listening(pool, sids, owner="ma")
        worker_processes.start(redis_url, "mb", metrics_port=ports["mb"])
        await wait_registered(pool, "mb")
        wa, wb = (f"http://127.0.0.1:{ports[w]}" for w in ("ma", "mb"))
        assert (await http.get(wa + "/healthz")).status_code == 200
        await eventually(
            lambda: _status(http, wb + "/readyz", 200), 10, "the second worker never got ready"
        )

        ws_seen: list[int] = []
        sse_seen: list[int] = []
        async with (
            PoolClient(gateway) as client,
            background(follow_ws(client, "m1", ws_seen), follow_sse(http, gateway, "m2", sse_seen)),
        ):
            await eventually(lambda: len(ws_seen) > 5 and len(sse_seen) > 5, 15, "no events")
            first_gw, first_w = await scrape(http, gateway), await scrape(http, wa)
            assert value(first_gw, "listenerpool_clients_connected", transport="ws") == 1
            assert value(first_gw, "listenerpool_clients_connected", transport="sse") == 1
            assert value(first_w, "listenerpool_listeners", state="listening") == 3
            assert value(first_w, "listenerpool_publish_latency_seconds_count") > 0

            async def moved() -> bool:
                gw, w = await scrape(http, gateway), await scrape(http, wa)
                return all(
                    value(now, name, **labels) > value(before, name, **labels)
                    for now, before, name, labels in (
                        (w, first_w, "listenerpool_events_published_total", {}),
                        (gw, first_gw, "listenerpool_events_delivered_total", {"transport": "ws"}),
                        (gw, first_gw, "listenerpool_events_delivered_total", {"transport": "sse"}),
                    )
                )

            await eventually(moved, 10, "published/delivered counters did not increase")

            before_b = await scrape(http, wb)
            assert value(before_b, "listenerpool_failovers_total") == 0
            victim.send_signal(signal.SIGKILL)
            await wait_listening(pool, sids, owner="mb", timeout=15)

            async def took_over() -> bool:
                after = await scrape(http, wb)
                return (
                    value(after, "listenerpool_failovers_total") >= 1
                    and value(after, "listenerpool_listeners", state="listening") == 3
                    and value(after, "listenerpool_events_published_total") > 0
                )

            await eventually(took_over, 10, "the survivor's metrics do not show the failover")
            after = await scrape(http, wb)
            assert value(after, "listenerpool_failovers_total") <= len(sids)
            assert value(after, "listenerpool_self_fences_total") == 0
            # The killed worker's readers are new on the survivor: none backed off.
            for reason in ReconnectReason:
                assert (
                    value(after, "listenerpool_upstream_reconnects_total", reason=reason.value) == 0
                )
    finally:
        await http.aclose()
        await pool.aclose()


async def _status(http: httpx.AsyncClient, url: str, expected: int) -> bool:
    try:
        return (await http.get(url)).status_code == expected
    except httpx.TransportError:
        return False
