"""Many sessions over one connection: ``GET /v1/stream`` as a WebSocket or as Server-Sent Events.

The frames and the SSE position id are in :mod:`gateway.streamproto`; the sessions' feeds and the
connection's shared queue in :mod:`gateway.multiplex`. Here: the routes, admission, and the
sender and watcher tasks of each transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, WebSocket
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from gateway.auth import StreamAccess, stream_access
from gateway.errors import ApiError, error_response, error_responses
from gateway.feed import EventFrame
from gateway.limits import ClientLimitReached
from gateway.multiplex import Control, Multiplex, Outgoing, SessionFrame
from gateway.state import GatewayState
from gateway.streamproto import (
    StreamError,
    Subscribe,
    decode_position_id,
    encode_position_id,
    error_frame,
    event_frame,
    list_tag,
    parse_client_frame,
    parse_sessions,
    reset_frame,
)
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
from listenerpool.metrics import GatewayMetrics, Transport

router = APIRouter(prefix="/v1")

RETRY_MS = 1000  # the SSE reconnection delay asked of browsers (theirs is about 3 s)


def frame_text(item: Outgoing) -> str:
    """The JSON text of an outgoing frame (the same over WebSocket and SSE)."""
    if isinstance(item, Control):
        return item.text
    frame = item.frame
    if isinstance(frame, EventFrame):
        return event_frame(item.sid, frame.raw)
    return reset_frame(item.sid, frame.after, frame.first_seq)


async def _outbox(mux: Multiplex) -> AsyncIterator[Outgoing]:
    while True:
        yield await mux.outbox.get()


# -- SSE ---------------------------------------------------------------------------------------
class StreamSSE(Response):
    """An ASGI response streaming a multiplex as text/event-stream, every event's ``id:`` the
    position id of all its sessions."""

    def __init__(
        self, state: GatewayState, access: StreamAccess, sessions: list[tuple[str, int]]
    ) -> None:
        # Response's body handling is not used: __call__ streams the multiplex itself.
        self.status_code = 200
        self.background = None
        self._state = state
        self._access = access
        self._sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Admitted here, not in the route, so the place is freed whatever ends the stream.
        try:
            admission = self._state.clients.admit_connection()
        except ClientLimitReached as exc:
            refusal = error_response(exc.status, exc.code, exc.message, **{"Retry-After": "1"})
            await refusal(scope, receive, send)
            return
        with admission:
            mux = Multiplex(self._state, self._access)
            try:
                await self._stream(mux, receive, send)
            finally:
                await mux.aclose()

    async def _stream(self, mux: Multiplex, receive: Receive, send: Send) -> None:
        metrics = self._state.metrics
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        clients = metrics.clients[Transport.SSE]
        clients.inc()
        sender = asyncio.create_task(self._send_frames(mux, send))
        starter = asyncio.create_task(_subscribe_all(mux, self._sessions))
        watcher = asyncio.create_task(wait_http_disconnect(receive))
        overflow = asyncio.create_task(mux.overflowed.wait())
        failed = asyncio.create_task(mux.failed.wait())
        try:
            await asyncio.wait(
                {sender, watcher, overflow, failed}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            await finish(sender, starter, watcher, overflow, failed)
            clients.dec()
        if overflow.done() and not overflow.cancelled():
            metrics.slow_disconnects[Transport.SSE].inc()
        if not watcher.done() or watcher.cancelled():
            # Falling behind or Redis failing ends the stream; the browser resumes by its id.
            await end_sse(send)

    async def _send_frames(self, mux: Multiplex, send: Send) -> None:
        delivered = self._state.metrics.delivered[Transport.SSE]
        sids = [sid for sid, _ in self._sessions]
        index = {sid: i for i, sid in enumerate(sids)}
        positions = [after for _, after in self._sessions]
        tag = list_tag(sids)
        await send(
            {
                "type": "http.response.body",
                "body": f"retry: {RETRY_MS}\n\n".encode(),
                "more_body": True,
            }
        )
        heartbeat = self._state.settings.client_heartbeat
        async for item in with_heartbeats(_outbox(mux), heartbeat):
            if item is None:
                data = HEARTBEAT
            elif isinstance(item, Control):
                data = f"data: {item.text}\n\n".encode()
            else:
                frame = item.frame
                i = index[item.sid]
                positions[i] = frame.seq if isinstance(frame, EventFrame) else frame.first_seq - 1
                position = encode_position_id(tag, positions)
                data = f"id: {position}\ndata: {frame_text(item)}\n\n".encode()
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if isinstance(item, SessionFrame) and isinstance(item.frame, EventFrame):
                delivered.inc()


async def _subscribe_all(mux: Multiplex, sessions: list[tuple[str, int]]) -> None:
    for sid, after in sessions:
        await mux.subscribe(sid, after)


SESSIONS_DOC = (
    "The sessions to follow, comma-separated, each optionally with the seq after which to "
    "start: `a,b:12,c`. At most LP_MAX_SESSIONS_PER_STREAM (default 256)."
)


@router.get(
    "/stream",
    response_model=None,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "The sessions' frames, each a `data:` line of JSON: "
            "StreamEventFrame (with an `id:`) or StreamControlFrame (see the components)",
        },
        **error_responses(400, 401, 503),
    },
)
async def sse_stream(
    request: Request,
    sessions: Annotated[str | None, Query(description=SESSIONS_DOC)] = None,
    token: Annotated[str | None, Query(description="A subscribe token naming the sessions")] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="The `id:` of the last event received: resumes every session from it",
        ),
    ] = None,
) -> Any:
    """Several sessions' events over one Server-Sent Events stream. Every `data:` is a JSON
    frame: an event (the envelope with its `sid`) or a control frame with an `op`
    (`subscribed`, `reset`, `error`). Every event's `id:` holds the position of every session
    of the stream, so a browser's `EventSource` resumes them all by itself on reconnecting, on
    any gateway. A session that cannot be followed (unknown, not in the token) gets an `error`
    frame; the others go on.

    The same path as a WebSocket serves the same frames, and takes SubscribeFrame and
    UnsubscribeFrame from the client (schemas in the components); ``?sessions=`` subscribes
    from the start. It closes with 1013 when the client falls behind, 4401 without valid
    credentials, 4400 for a bad ``?sessions=``, 4503 when the gateway is full or Redis fails."""
    state: GatewayState = request.app.state.gateway
    access = stream_access(state.settings, request.headers, request.query_params)
    try:
        parsed = parse_sessions(sessions, state.settings.max_sessions_per_stream)
        if last_event_id:
            sids = [sid for sid, _ in parsed]
            positions = decode_position_id(last_event_id, list_tag(sids), len(sids))
            parsed = list(zip(sids, positions, strict=True))
    except StreamError as exc:
        raise ApiError(400, exc.code, exc.message) from None
    return StreamSSE(state, access, parsed)


# -- WebSocket ---------------------------------------------------------------------------------
@router.websocket("/stream")
async def ws_stream(websocket: WebSocket) -> None:
    """Several sessions' events over one WebSocket. Send `{"op": "subscribe", "sid", "after"}`
    and `{"op": "unsubscribe", "sid"}`; receive events (the envelope with its `sid`) and
    control frames (`subscribed`, `unsubscribed`, `reset`, `error`). ``?sessions=a,b:12``
    subscribes from the start."""
    state: GatewayState = websocket.app.state.gateway
    await websocket.accept()  # so that a refusal reaches the client as a close code
    try:
        access = stream_access(state.settings, websocket.headers, websocket.query_params)
        initial = websocket.query_params.get("sessions")
        limit = state.settings.max_sessions_per_stream
        sessions = parse_sessions(initial, limit) if initial else []
        admission = state.clients.admit_connection()
    except ApiError as exc:
        await websocket.close(code=4000 + exc.status, reason=f"{exc.code}: {exc.message}"[:120])
        return
    except StreamError as exc:
        await websocket.close(code=4400, reason=f"{exc.code}: {exc.message}"[:120])
        return
    except ClientLimitReached as exc:
        await websocket.close(code=4000 + exc.status, reason=f"{exc.code}: {exc.message}"[:120])
        return
    with admission:
        mux = Multiplex(state, access)
        try:
            await _ws_serve(websocket, mux, sessions, state.metrics)
        finally:
            await mux.aclose()


async def _ws_serve(
    websocket: WebSocket,
    mux: Multiplex,
    sessions: list[tuple[str, int]],
    metrics: GatewayMetrics,
) -> None:
    clients = metrics.clients[Transport.WS]
    clients.inc()
    sender = asyncio.create_task(_ws_send(websocket, mux, metrics))
    receiver = asyncio.create_task(_ws_receive(websocket, mux, sessions))
    overflow = asyncio.create_task(mux.overflowed.wait())
    failed = asyncio.create_task(mux.failed.wait())
    try:
        await asyncio.wait(
            {sender, receiver, overflow, failed}, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        await finish(sender, receiver, overflow, failed)
        clients.dec()
    if overflow.done() and not overflow.cancelled():
        metrics.slow_disconnects[Transport.WS].inc()
        await ws_close(websocket, TOO_SLOW, "client too slow: resubscribe after your last seqs")
    elif failed.done() and not failed.cancelled():
        await ws_close(websocket, 4503, "Redis is unavailable: resubscribe after your last seqs")


async def _ws_send(websocket: WebSocket, mux: Multiplex, metrics: GatewayMetrics) -> None:
    delivered = metrics.delivered[Transport.WS]
    async for item in _outbox(mux):
        await websocket.send_text(frame_text(item))
        if isinstance(item, SessionFrame) and isinstance(item.frame, EventFrame):
            delivered.inc()


async def _ws_receive(
    websocket: WebSocket, mux: Multiplex, sessions: list[tuple[str, int]]
) -> None:
    await _subscribe_all(mux, sessions)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                frame = parse_client_frame(message.get("text"))
            except StreamError as exc:
                await mux.outbox.put(Control(error_frame(exc.sid, exc.code, exc.message)))
                continue
            if isinstance(frame, Subscribe):
                await mux.subscribe(frame.sid, frame.after, frame.token)
            else:
                await mux.unsubscribe(frame.sid)
    except WebSocketDisconnect:
        return
