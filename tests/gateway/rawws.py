"""A WebSocket client done by hand, for tests of clients that stop reading."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct


class RawWebSocket:
    """A WebSocket client socket done by hand, for a consumer that stops reading: a tiny
    receive buffer, nothing read until :meth:`frame` is called, and then every byte the gateway
    sent (text frames, close frame, FIN or reset) seen exactly as sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = ""

    @classmethod
    async def connect(cls, base: str, path: str) -> RawWebSocket:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        ws = cls(sock)
        while b"\r\n\r\n" not in ws.buf:
            assert await ws._fill(), "no handshake answer"
        head, _, rest = bytes(ws.buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        ws.buf = bytearray(rest)
        return ws

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def _fill(self) -> bool:
        try:
            data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        except ConnectionResetError:
            self.eof = "reset"
            return False
        if not data:
            self.eof = "fin"
            return False
        self.buf += data
        return True

    async def frame(self) -> tuple[int, bytes] | None:
        """The next (opcode, payload) from the server (unmasked), or None at the end."""
        while True:
            if len(self.buf) >= 2:
                size, offset = self.buf[1] & 0x7F, 2
                if size == 126 and len(self.buf) >= 4:
                    size, offset = struct.unpack(">H", self.buf[2:4])[0], 4
                elif size == 127 and len(self.buf) >= 10:
                    size, offset = struct.unpack(">Q", self.buf[2:10])[0], 10
                if (size < 126 or offset > 2) and len(self.buf) >= offset + size:
                    opcode = self.buf[0] & 0x0F
                    payload = bytes(self.buf[offset : offset + size])
                    del self.buf[: offset + size]
                    return opcode, payload
            if not await self._fill():
                return None

    def close(self) -> None:
        self.sock.close()
