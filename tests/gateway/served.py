"""A gateway over fakeredis inside a test's loop: served by uvicorn on a free loopback port, or
called in-process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gateway import create_app
from listenerpool.cli.launch import gateway_server
from listenerpool.settings import Settings
from listenerpool.testing.loopthread import listen_socket
from tests.conftest import eventually


@contextlib.asynccontextmanager
async def gateway(settings: Settings, fake_redis: Any, fake_sync: Any) -> AsyncIterator[str]:
    """``host:port`` of a gateway serving ``settings`` (as ``listenerpool gateway`` would)."""
    app = create_app(settings, redis=fake_redis, sync=fake_sync)
    server = gateway_server(settings, app=app)
    sock = listen_socket("127.0.0.1", 0)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started, 10, "gateway did not start")
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def in_process(
    settings: Settings, fake_redis: Any, fake_sync: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client calling the gateway app directly (base URL ``http://gw``)."""
    app = create_app(settings, redis=fake_redis, sync=fake_sync)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client
