"""Process entry points behind the CLI: a gateway, a worker, or both in one process (``up``),
with an embedded Redis when no ``LP_REDIS_URL`` is set.

The gateway and worker packages are imported here, lazily, so the core stays free of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from listenerpool.connections import async_redis, listen_queue, sync_redis
from listenerpool.embedded import EmbeddedRedis
from listenerpool.settings import Settings

log = logging.getLogger("listenerpool")


@contextlib.contextmanager
def redis_for(settings: Settings, announce: Callable[[str], None]) -> Iterator[Settings]:
    """``settings`` with a Redis URL: the configured one, or an embedded Redis for the duration."""
    if settings.redis_url:
        yield settings
        return
    with EmbeddedRedis() as embedded:
        announce(embedded.describe())
        yield settings.model_copy(update={"redis_url": embedded.url})


@contextlib.asynccontextmanager
async def stop_on_signals() -> AsyncIterator[asyncio.Event]:
    """An event set by the first SIGINT/SIGTERM; a second one exits at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            raise SystemExit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def gateway_server(settings: Settings, app: Any | None = None) -> Any:
    """A uvicorn server for the gateway that leaves signal handling to the caller."""
    import uvicorn

    from gateway.app import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        app or create_app(settings),
        host=settings.host,
        port=settings.port,
        ws="websockets",
        ws_ping_interval=settings.client_heartbeat,
        ws_ping_timeout=settings.client_heartbeat,
        log_level=settings.log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    return Server(config)


async def serve_gateway(settings: Settings, stop: asyncio.Event) -> None:
    server = gateway_server(settings)
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    server.should_exit = True
    await serving


async def serve_worker(settings: Settings, stop: asyncio.Event) -> None:
    from workers.worker import Worker

    redis = async_redis(settings)
    sync = sync_redis(settings)
    try:
        await Worker(settings, redis=redis, queue=listen_queue(sync, settings)).run(stop)
    finally:
        await redis.aclose()
        sync.close()


async def serve_up(settings: Settings, stop: asyncio.Event) -> None:
    """A gateway and a worker on one loop until ``stop`` is set; the worker drains first."""
    gateway = asyncio.create_task(serve_gateway(settings, stop), name="gateway")
    worker = asyncio.create_task(serve_worker(settings, stop), name="worker")
    await asyncio.gather(gateway, worker)
