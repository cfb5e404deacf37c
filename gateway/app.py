"""The gateway ASGI app: control API, fan-out of session events, health and readiness, and
the dashboard's static files.

``create_app(settings)`` builds a FastAPI app whose lifespan opens the Redis clients and the
fan-out hub. To mount it in another Starlette/FastAPI app, enter :func:`gateway_lifespan` from
the host app's lifespan (mounted apps' own lifespans are not run by Starlette).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import control_api, events_api, stream_api, ui_routes
from gateway.errors import error_response, error_responses, install_error_handlers
from gateway.hub import FanoutHub
from gateway.limits import ClientLimits
from gateway.openapi import install_openapi
from gateway.ratelimit import RateLimit, RateLimiter
from gateway.state import GatewayState
from listenerpool.connections import async_redis, check_server, listen_queue, sync_redis
from listenerpool.control import SessionControl
from listenerpool.metrics import CONTENT_TYPE, GatewayMetrics, exposition
from listenerpool.settings import Settings
from listenerpool.shardsub import REDIS_ERRORS


@asynccontextmanager
async def gateway_lifespan(
    app: FastAPI, *, redis: Any = None, sync: Any = None
) -> AsyncIterator[None]:
    """Open what the gateway needs on ``app.state.gateway`` and close it on exit. Clients
    passed in (e.g. fakeredis in tests) are used and not closed."""
    settings: Settings = app.state.settings
    metrics: GatewayMetrics = app.state.metrics
    own = redis is None
    redis = redis if redis is not None else async_redis(settings)
    sync = sync if sync is not None else sync_redis(settings)
    hub = FanoutHub(
        redis,
        max_items=settings.client_queue,
        max_bytes=settings.client_queue_bytes,
        check_interval=settings.stream_check_interval,
        metrics=metrics,
    )
    control = SessionControl(redis, listen_queue(sync, settings), settings)
    clients = ClientLimits(per_session=settings.max_clients_per_session, total=settings.max_clients)
    app.state.gateway = GatewayState(settings, redis, control, hub, clients, metrics)
    with contextlib.suppress(*REDIS_ERRORS):  # Redis may come later; calls load on demand
        await check_server(redis)
        await control.scripts.preload(redis)
    await hub.start()
    try:
        yield
    finally:
        await hub.aclose()
        if own:
            await redis.aclose()
            sync.close()


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413 before any route reads them.

    Bodies of the control API are small JSON documents, so they are read here in full (up to the
    limit) and handed to the route afterwards; a declared Content-Length over the limit is
    refused without reading anything.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = error_response(413, "body_too_large", f"body over {self.limit} bytes")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(settings: Settings, *, redis: Any = None, sync: Any = None) -> FastAPI:
    """The gateway app. ``redis``/``sync`` override the clients built from ``settings``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with gateway_lifespan(app, redis=redis, sync=sync):
            yield

    app = FastAPI(
        title="listenerpool gateway",
        version="0.1.0",
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics()  # a registry per app: many apps fit in one process
    install_error_handlers(app)
    app.include_router(control_api.router)
    app.include_router(events_api.router)
    app.include_router(stream_api.router)
    app.include_router(ui_routes.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.api_rate > 0:  # outside the body limit: a refused request is not read
        app.add_middleware(RateLimit, limiter=RateLimiter(settings.api_rate, settings.api_burst))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", responses=error_responses(503))
    async def readyz() -> JSONResponse:
        """Redis answers: the gateway can take control calls and serve clients."""
        state: GatewayState = app.state.gateway
        try:
            async with asyncio.timeout(1.0):
                await state.redis.ping()
        except (*REDIS_ERRORS, TimeoutError) as exc:
            app.state.metrics.redis_error["api"].inc()
            return error_response(503, "redis_unavailable", f"Redis is unavailable: {exc}")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """This gateway's metrics in the Prometheus text format."""
        return Response(exposition(app.state.metrics.registry), media_type=CONTENT_TYPE)

    install_openapi(app)
    return app
