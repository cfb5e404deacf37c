"""What every event connection does the same way, SSE or WebSocket, one session or many: the
SSE response headers, heartbeats on idle streams, noticing a client leave, closing a WebSocket
without waiting on a client that stopped reading, and stopping a connection's tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from starlette.types import Receive
from starlette.websockets import WebSocket

from gateway.feed import ClientTooSlow
from gateway.wsprotocol import FORCE_CLOSE
from listenerpool.tasks import cancel_until_done

T = TypeVar("T")

TOO_SLOW = 1013  # WebSocket "try again later"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
HEARTBEAT = b": heartbeat\n\n"


async def finish(*tasks: asyncio.Task[Any]) -> None:
    """Stop the tasks of one connection and collect their outcomes (a client that vanished
    makes sends fail; that is how a connection ends, not an error to report)."""
    await asyncio.gather(*(cancel_until_done(t) for t in tasks))
    for task in tasks:
        if not task.cancelled():
            task.exception()


async def with_heartbeats(items: AsyncIterator[T], every: float) -> AsyncIterator[T | None]:
    """The items, with ``None`` whenever ``every`` seconds pass without one. Ends when
    ``items`` does or raises :class:`ClientTooSlow`."""
    pending: asyncio.Task[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            item = pending.result()
            pending = None
            yield item
    except (StopAsyncIteration, ClientTooSlow):
        return
    finally:
        if pending is not None:
            # The item being read may be in a Redis call, which can absorb one cancel.
            await cancel_until_done(pending)
            if not pending.cancelled():
                pending.exception()  # read, so asyncio does not log it: the stream is over


async def wait_http_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def end_sse(send: Any) -> None:
    """End a streaming response the server side chose to end (the client resumes by id)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def ws_close(websocket: WebSocket, code: int, reason: str) -> None:
    """Close without waiting on a client that may have stopped reading (see
    :mod:`gateway.wsprotocol`); under another server, a plain close with a timeout."""
    force = websocket.scope.get("extensions", {}).get(FORCE_CLOSE)
    if force is not None:
        force["close"](code, reason)
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1):
            await websocket.close(code=code, reason=reason)
