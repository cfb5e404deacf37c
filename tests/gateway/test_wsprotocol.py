"""The gateway's WebSocket protocol drops a client that stopped reading: the close frame is
queued behind what is buffered, and the connection is reset if the client does not take it
within the grace."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from websockets.asyncio.client import connect

from gateway.wsprotocol import FORCE_CLOSE, SEND_NOW, GatewayWebSocketProtocol, text_frame
from listenerpool.testing.loopthread import listen_socket
from tests.conftest import eventually
from tests.gateway.rawws import RawWebSocket

FRAME = 16_000


@dataclass
class FloodingApp:
    """Sends numbered frames until a send stays blocked (the client stopped reading), then
    force-closes with 1013."""

    sent: int = 0
    forced: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            try:
                # How the app notices back-pressure, as the gateway's bounded queues do.
                async with asyncio.timeout(0.5):
                    text = f"{self.sent:08d}".ljust(FRAME, "x")
                    await send({"type": "websocket.send", "text": text})
            except TimeoutError:
                break
            self.sent += 1
        scope["extensions"][FORCE_CLOSE]["close"](1013, "client too slow")
        self.forced.set()


@dataclass
class SendNowApp:
    """Writes numbered frames through :data:`SEND_NOW` until it refuses one (the client stopped
    reading and the transport is full), then sends that frame through ASGI, which waits for
    room, and closes."""

    limit: int | None = None  # stop writing after this many, refused or not
    before_accept: bool | None = None
    sent: int = 0
    refused: asyncio.Event = field(default_factory=asyncio.Event)
    after_close: bool | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        send_text_now = scope["extensions"][SEND_NOW]["send_text"]
        await receive()
        self.before_accept = send_text_now(b"too early")
        await send({"type": "websocket.accept"})
        while self.limit is None or self.sent < self.limit:
            text = f"{self.sent:08d}".ljust(FRAME, "x").encode()
            # Every other message comes framed already, as the hub hands live events over.
            if not send_text_now(text, text_frame(text) if self.sent % 2 else None):
                break
            self.sent += 1
        self.refused.set()
        await send({"type": "websocket.send", "text": f"{self.sent:08d}".ljust(FRAME, "x")})
        self.sent += 1
        await send({"type": "websocket.close", "code": 1000})
        self.after_close = send_text_now(b"too late")


@contextlib.asynccontextmanager
async def serving(
    app: Any, grace: float, deflate: bool = False
) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    sock = listen_socket("127.0.0.1", 0)
    config = uvicorn.Config(
        app,
        ws=GatewayWebSocketProtocol,
        ws_ping_interval=None,
        ws_ping_timeout=grace,
        ws_per_message_deflate=deflate,
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started, 10, "server did not start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        await task
        sock.close()


async def read_all(ws: RawWebSocket) -> tuple[list[int], list[int]]:
    seqs, closes = [], []
    while (item := await ws.frame()) is not None:
        opcode, payload = item
        if opcode == 0x1:
            seqs.append(int(payload[:8]))
        elif opcode == 0x8:
            closes.append(struct.unpack(">H", payload[:2])[0])
    return seqs, closes


async def test_a_client_that_reads_again_within_the_grace_gets_everything_then_1013() -> None:
    app = FloodingApp()
    async with serving(app, grace=30) as (base, _):
        ws = await RawWebSocket.connect(base, "/")
        await asyncio.wait_for(app.forced.wait(), 20)
        seqs, closes = await read_all(ws)
        ws.close()
    assert app.sent > 0
    assert seqs == list(range(app.sent))
    assert closes == [1013]
    assert ws.eof == "fin"


async def test_a_client_that_never_reads_again_is_reset_after_the_grace() -> None:
    app = FloodingApp()
    async with serving(app, grace=0.5) as (base, server):
        ws = await RawWebSocket.connect(base, "/")
        await asyncio.wait_for(app.forced.wait(), 20)
        # Reading nothing, the client loses its connection on the server side ...
        await eventually(lambda: not server.server_state.connections, 10, "connection held")
        # ... and sees a reset, never the close frame it did not make room for.
        _, closes = await read_all(ws)
        ws.close()
    assert ws.eof == "reset"
    assert closes == []


async def test_send_now_writes_until_the_transport_is_full_then_refuses_losing_nothing() -> None:
    app = SendNowApp()
    async with serving(app, grace=30) as (base, _):
        ws = await RawWebSocket.connect(base, "/")
        await asyncio.wait_for(app.refused.wait(), 20)  # the client has read nothing yet
        seqs, closes = await read_all(ws)
        ws.close()
    assert app.before_accept is False
    assert app.sent > 1
    assert seqs == list(range(app.sent))
    assert closes == [1000]
    assert app.after_close is False


async def test_send_now_serves_a_client_that_negotiated_deflate() -> None:
    """A ready-made frame is for connections without extensions: with permessage-deflate the
    message is framed (and compressed) for that connection, and the client reads them all."""
    app = SendNowApp(limit=50)  # deflated repeats are tiny: the transport would take very many
    async with serving(app, grace=30, deflate=True) as (base, _):
        ws_url = base.replace("http://", "ws://") + "/"
        async with connect(ws_url, compression="deflate", max_size=None) as ws:
            assert ws.response is not None
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            texts = [text async for text in ws]
    assert app.sent == 51  # 50 written at once, then one through ASGI
    assert [int(t[:8]) for t in texts] == list(range(app.sent))
    assert all(t == f"{i:08d}".ljust(FRAME, "x") for i, t in enumerate(texts))
