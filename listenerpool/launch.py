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
from listenerpool.tasks import cancel_until_done

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
    """An event set by the first SIGINT/SIGTERM; a second one cancels the caller's task, which
    skips the graceful drain but still runs its ``finally`` blocks (child processes stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    caller = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and caller is not None:
            log.warning("second signal: stopping without a graceful drain")
            caller.cancel()
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
    from gateway.auth import listen_host
    from gateway.wsprotocol import GatewayWebSocketProtocol
    from listenerpool.logs import redact_server_logs

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        app or create_app(settings),
        host=listen_host(settings),
        port=settings.port,
        ws=GatewayWebSocketProtocol,
        ws_ping_interval=settings.client_heartbeat,
        ws_ping_timeout=settings.client_heartbeat,
        log_level=settings.log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=3,
        # JSON lines need every logger on the root handler; uvicorn's own config adds its
        # console handlers instead.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )
    redact_server_logs()  # after Config, which (re)configures uvicorn's loggers
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
    """A worker until ``stop`` is set, with its status port when ``LP_METRICS_PORT`` is set."""
    from workers.collector import tune_collector
    from workers.status_server import StatusServer
    from workers.worker import Worker

    tune_collector()
    redis = async_redis(settings)
    sync = sync_redis(settings)
    try:
        worker = Worker(settings, redis=redis, queue=listen_queue(sync, settings))
        if not settings.metrics_port:
            await worker.run(stop)
            return
        status = StatusServer(
            worker.metrics.registry, worker.healthy, settings.host, settings.metrics_port
        )
        with status:
            log.info("worker metrics on http://%s:%d/metrics", settings.host, status.port)
            await worker.run(stop)
    finally:
        await redis.aclose()
        sync.close()


async def serve_up(settings: Settings, stop: asyncio.Event) -> None:
    """A gateway and a worker on one loop until ``stop`` is set; the worker drains first."""
    gateway = asyncio.create_task(serve_gateway(settings, stop), name="gateway")
    worker = asyncio.create_task(serve_worker(settings, stop), name="worker")
    await asyncio.gather(gateway, worker)


async def until_signalled(coro: Any) -> None:
    """Run ``coro`` until it ends or SIGINT/SIGTERM arrives (then cancel it)."""
    async with stop_on_signals() as stop:
        task = asyncio.ensure_future(coro)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await cancel_until_done(task)


async def serve_command(command: str, settings: Settings, args: Any) -> None:
    """Run ``up``, ``gateway``, ``worker`` or ``demo`` until SIGINT/SIGTERM."""
    async with stop_on_signals() as stop:
        if command == "gateway":
            log.info("gateway on http://%s:%d", settings.host, settings.port)
            await serve_gateway(settings, stop)
        elif command == "worker":
            await serve_worker(settings, stop)
        elif command == "up":
            print(f"gateway on http://{settings.host}:{settings.port}", flush=True)
            await serve_up(settings, stop)
        elif command == "demo":
            await serve_demo(
                settings, stop, sessions=args.sessions, upstream_port=args.upstream_port
            )
        else:
            raise ValueError(f"unknown command {command!r}")


async def serve_demo(
    settings: Settings, stop: asyncio.Event, *, sessions: int, upstream_port: int
) -> None:
    """``up`` plus the demo upstream and ``sessions`` sessions reading it."""
    from listenerpool.client import PoolClient
    from listenerpool.demo_upstream import DemoUpstream

    async with DemoUpstream("127.0.0.1", upstream_port) as upstream:
        pool = asyncio.create_task(serve_up(settings, stop), name="pool")
        base = f"http://{settings.host}:{settings.port}"
        try:
            async with PoolClient(base) as client:
                await _wait_ready(client, pool)
                sids = [f"demo-{i}" for i in range(1, sessions + 1)]
                for sid in sids:
                    await client.start(sid, upstream.events_url(sid))
            print(_demo_instructions(base, upstream.port, sids), flush=True)
            await pool
        finally:
            if not pool.done():
                stop.set()
                await pool


async def _wait_ready(client: Any, pool: asyncio.Task[None], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if pool.done():
            pool.result()  # the pool failed to start: raise its error
            raise RuntimeError("the pool stopped before it was ready")
        try:
            await client.workers()
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def _demo_instructions(base: str, upstream_port: int, sids: list[str]) -> str:
    first = sids[0] if sids else "demo-1"
    return f"""
listenerpool demo is running: gateway {base}, demo upstream http://127.0.0.1:{upstream_port}
sessions: {", ".join(sids)}

watch them:
  listenerpool status --gateway {base}
  listenerpool tail {first} --gateway {base}
  curl -N {base}/v1/sessions/{first}/events
  websocket: ws://{base.split("://", 1)[1]}/v1/sessions/{first}/events?after=0
start another:
  curl -X PUT {base}/v1/sessions/mine -H 'content-type: application/json' \\
       -d '{{"url": "http://127.0.0.1:{upstream_port}/events/mine"}}'
stop one:
  listenerpool cancel {first} --gateway {base}
Ctrl-C stops everything.
"""
