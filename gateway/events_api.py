"""A session's events to one client, as Server-Sent Events or over a WebSocket (same path).

Both transports run the same :class:`~gateway.feed.SessionFeed` in a sender task, beside a
watcher that ends the connection when the client leaves or falls behind. Only event frames
carry an SSE ``id:``; heartbeats and notices carry none, so ``Last-Event-ID`` never moves past
an event the client did not receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from gateway.auth import check_subscriber
from gateway.errors import ApiError, error_response, error_responses
from gateway.feed import ClientTooSlow, Frame, ResetFrame, SessionFeed
from gateway.hub import HubUnavailable
from gateway.limits import ClientLimitReached, ClientLimits
from gateway.state import GatewayState
from gateway.transport import (
    HEARTBEAT,
    SSE_HEADERS,
    TOO_SLOW,
    end_sse,
    finish,
    wait_http_disconnect,
    with_heartbeats,
    ws_close,
)
from gateway.wsprotocol import SEND_NOW
from listenerpool.envelope import Envelope
from listenerpool.errors import InvalidInput
from listenerpool.keys import SessionKeys
from listenerpool.metrics import GatewayMetrics, Transport
from listenerpool.shardsub import REDIS_ERRORS

router = APIRouter(prefix="/v1")


def parse_after(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not value.isdigit() or len(value) > 18:
        raise ApiError(
            400, "invalid_after", f"after/Last-Event-ID must be a seq number, not {value!r}"
        )
    return int(value)


async def require_session(state: GatewayState, sid: str) -> None:
    if not await state.redis.exists(SessionKeys(sid).spec):
        raise ApiError(404, "unknown_session", f"session {sid!r} does not exist")


def sse_bytes(frame: Frame) -> bytes:
    if isinstance(frame, ResetFrame):
        notice = json.dumps({"after": frame.after, "first_seq": frame.first_seq})
        return f"event: lp-reset\ndata: {notice}\n\n".encode()
    env = Envelope.from_json(frame.raw)
    lines = "".join(f"data: {line}\n" for line in env.data.split("\n"))
    return f"id: {env.seq}\nevent: {env.event}\n{lines}\n".encode()


def ws_text(frame: Frame) -> str:
    if isinstance(frame, ResetFrame):
        return json.dumps({"type": "reset", "after": frame.after, "first_seq": frame.first_seq})
    return frame.raw


class SSEStream(Response):
    """An ASGI response streaming a feed as text/event-stream with heartbeats."""

    def __init__(
        self,
        sid: str,
        feed: SessionFeed,
        heartbeat: float,
        clients: ClientLimits,
        metrics: GatewayMetrics,
    ) -> None:
        # Response's body handling is not used: __call__ streams the feed itself.
        self.status_code = 200
        self.background = None
        self._sid = sid
        self._feed = feed
        self._heartbeat = heartbeat
        self._clients = clients
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Admitted here, not in the route, so the place is freed whatever ends the stream.
        try:
            admission = self._clients.admit(self._sid)
        except ClientLimitReached as exc:
            refusal = error_response(exc.status, exc.code, exc.message, **{"Retry-After": "1"})
            await refusal(scope, receive, send)
            return
        with admission:
            await self._stream(scope, receive, send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._feed:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            clients = self._metrics.clients[Transport.SSE]
            clients.inc()
            sender = asyncio.create_task(self._send_frames(send))
            watcher = asyncio.create_task(wait_http_disconnect(receive))
            overflow = asyncio.create_task(self._feed.overflowed.wait())
            try:
                await asyncio.wait({sender, watcher, overflow}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await finish(sender, watcher, overflow)
                clients.dec()
            if overflow.done() and not overflow.cancelled():
                self._metrics.slow_disconnects[Transport.SSE].inc()
            if not watcher.done() or watcher.cancelled():
                # Falling behind ends the stream; the client resumes with Last-Event-ID.
                await end_sse(send)

    async def _send_frames(self, send: Send) -> None:
        delivered = self._metrics.delivered[Transport.SSE]
        async for chunk in with_heartbeats(self._feed.frames(), self._heartbeat):
            data = HEARTBEAT if chunk is None else sse_bytes(chunk)
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if chunk is not None and not isinstance(chunk, ResetFrame):
                delivered.inc()


@router.get(
    "/sessions/{sid}/events",
    response_model=None,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "The event stream",
        },
        **error_responses(400, 401, 403, 404, 429, 503),
    },
)
async def sse_events(sid: str, request: Request) -> Any:
    """The session's events as Server-Sent Events (``id:`` = seq). Resume with the
    ``Last-Event-ID`` header or ``?after=<seq>``. With auth configured, pass a subscribe token
    as ``?token=`` (or an API token as a bearer header)."""
    state: GatewayState = request.app.state.gateway
    check_subscriber(state.settings, sid, request.headers, request.query_params)
    after = parse_after(request.headers.get("last-event-id") or request.query_params.get("after"))
    await require_session(state, sid)
    return SSEStream(
        sid,
        SessionFeed(state.hub, state.redis, sid, after),
        state.settings.client_heartbeat,
        state.clients,
        state.metrics,
    )


@router.websocket("/sessions/{sid}/events")
async def ws_events(websocket: WebSocket, sid: str) -> None:
    """The session's events as WebSocket text frames: envelopes ``{"seq", "epoch", "event",
    "data", "id"}`` and notices ``{"type": "reset", ...}``. Resume with ``?after=<seq>``."""
    state: GatewayState = websocket.app.state.gateway
    # Accept first so that a refusal reaches the client as a close code (4000 + the HTTP
    # status a plain request would get) rather than a bare 403 handshake failure.
    await websocket.accept()
    try:
        SessionKeys(sid)
        check_subscriber(state.settings, sid, websocket.headers, websocket.query_params)
        after = parse_after(websocket.query_params.get("after"))
        await require_session(state, sid)
        admission = state.clients.admit(sid)
    except (ApiError, InvalidInput) as exc:
        status = exc.status if isinstance(exc, ApiError) else 400
        await websocket.close(code=4000 + status, reason=str(exc)[:120])
        return
    except ClientLimitReached as exc:
        # 4429: this session's clients; 4503: this gateway is full. The reason says which.
        await websocket.close(code=4000 + exc.status, reason=f"{exc.code}: {exc.message}"[:120])
        return
    except (*REDIS_ERRORS, HubUnavailable) as exc:
        await websocket.close(code=4503, reason=f"Redis is unavailable: {exc}"[:120])
        return
    with admission:  # the place is freed however the connection ends
        feed = SessionFeed(state.hub, state.redis, sid, after)
        try:
            await feed.__aenter__()
        except (*REDIS_ERRORS, HubUnavailable) as exc:
            await websocket.close(code=4503, reason=f"Redis is unavailable: {exc}"[:120])
            return
        try:
            await _ws_serve(websocket, feed, state.metrics)
        finally:
            await feed.__aexit__(None, None, None)


async def _ws_serve(websocket: WebSocket, feed: SessionFeed, metrics: GatewayMetrics) -> None:
    clients = metrics.clients[Transport.WS]
    clients.inc()
    sender = asyncio.create_task(_ws_send(websocket, feed, metrics))
    watcher = asyncio.create_task(_ws_wait_disconnect(websocket))
    overflow = asyncio.create_task(feed.overflowed.wait())
    try:
        await asyncio.wait({sender, watcher, overflow}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await finish(sender, watcher, overflow)
        clients.dec()
    if overflow.done() and not overflow.cancelled():
        metrics.slow_disconnects[Transport.WS].inc()
        await ws_close(websocket, TOO_SLOW, "client too slow: resume by seq")
    elif sender.done() and not sender.cancelled() and sender.exception() is not None:
        # Redis failed mid-stream: say so, so the client resumes by seq.
        await ws_close(websocket, 4503, "Redis is unavailable: resume by seq")


async def _ws_send(websocket: WebSocket, feed: SessionFeed, metrics: GatewayMetrics) -> None:
    delivered = metrics.delivered[Transport.WS]
    send_now = websocket.scope.get("extensions", {}).get(SEND_NOW)
    if send_now is not None:
        feed.deliver_directly(send_now["send_text"])  # the hub counts those deliveries
    with contextlib.suppress(ClientTooSlow):
        async for frame in feed.frames():
            await websocket.send_text(ws_text(frame))
            if not isinstance(frame, ResetFrame):
                delivered.inc()


async def _ws_wait_disconnect(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
