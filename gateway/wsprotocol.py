"""uvicorn's WebSocket protocol, plus a way to drop a client that has stopped reading.

ASGI has no way to abort a connection. A ``websocket.close`` sent to uvicorn waits until the
transport is writable again, and a client that has stopped reading never lets it become
writable, so its socket (and everything queued for it) would be held until it reads. The
protocol here offers the gateway's routes an ASGI scope extension, :data:`FORCE_CLOSE`: it
queues the close frame behind whatever is already buffered, closes the transport, and resets
the connection if the client has not taken it all within the grace period (the keepalive ping
timeout, or :data:`DEFAULT_GRACE`). A client that reads again in time sees the close frame; one
that does not loses its connection. Keepalive timeouts end the same way.

A second extension, :data:`SEND_NOW`, frames and writes a text message at once, as
``websockets``' own ``broadcast()`` does, when the connection is open and its transport has
room: a live event then reaches the socket from the hub's callback, with no task switch and no
trip through the ASGI send path. When it cannot (no room, closing), the route takes the ASGI
path, which waits for room or ends with the connection.

When the gateway is mounted in another server, the extensions are absent and the routes fall
back to a plain close with a timeout and to the ASGI send.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State

FORCE_CLOSE = "listenerpool.force_close"
SEND_NOW = "listenerpool.send_now"
DEFAULT_GRACE = 10.0


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with the :data:`FORCE_CLOSE` scope extension."""

    @property
    def grace(self) -> float:
        return self.ping_timeout or DEFAULT_GRACE

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope: Any = getattr(self, "scope", None)
        if scope is not None:
            # The ASGI task is created but has not run yet, so it sees the extension.
            extensions = scope.setdefault("extensions", {})
            extensions[FORCE_CLOSE] = {"close": self.force_close}
            extensions[SEND_NOW] = {"send_text": self.send_text_now}

    def send_text_now(self, text: bytes, frame: bytes | None = None) -> bool:
        """Write ``text`` (UTF-8) as one text message now; False (nothing written) unless the
        handshake is done, the connection open and the transport writable. ``frame``, the
        message already framed by :func:`text_frame`, is written as it is on a connection
        without extensions (the same bytes for every client: no framing per client)."""
        if (
            self.close_sent
            or not self.handshake_complete
            or self.initial_response is not None
            or self.transport.is_closing()
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
        ):
            return False
        if frame is not None and not self.conn.extensions:
            self.transport.write(frame)
            return True
        self.conn.send_text(text)
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    def force_close(self, code: int, reason: str) -> None:
        """Send a close frame without waiting for the client to make room, then close; reset
        the connection if the client has not read up to the close frame within the grace."""
        if self.transport.is_closing():
            return
        if not self.close_sent:
            self.conn.send_close(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
        self.transport.close()
        self.loop.call_later(self.grace, self._reset)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        # uvicorn closes gracefully, which never completes for a client that stopped reading.
        self.loop.call_later(self.grace, self._reset)

    def _reset(self) -> None:
        """Drop the connection with a TCP reset: a plain close would leave the kernel holding
        the unsent bytes for a peer that is not reading them."""
        if self.disconnected:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.fileno() != -1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def text_frame(text: bytes) -> bytes:
    """``text`` (UTF-8) as a server's unmasked text frame with no extension, as ``websockets``
    frames it: what :meth:`GatewayWebSocketProtocol.send_text_now` writes to such connections."""
    return Frame(Opcode.TEXT, text).serialize(mask=False, extensions=[])
