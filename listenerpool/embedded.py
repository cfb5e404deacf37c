"""A Redis for single-node mode, when no ``LP_REDIS_URL`` is given.

A child ``redis-server`` on a free loopback port when the binary is on PATH; otherwise an
in-process fakeredis served over TCP (Lua through lupa), so the pool runs with no Redis
installed at all. Nothing is persisted in either case.
"""

from __future__ import annotations

import shutil
import threading
from typing import Literal

from listenerpool.testing.loopthread import Service
from listenerpool.testing.redis_server import RedisServer, free_port

Kind = Literal["redis-server", "fakeredis"]


class EmbeddedRedis(Service):
    """Starts on :meth:`start`, stops (and forgets all data) on :meth:`stop`."""

    def __init__(self, prefer: Kind | None = None) -> None:
        self.kind: Kind = prefer or (
            "redis-server" if shutil.which("redis-server") else "fakeredis"
        )
        self.port = 0
        self._child: RedisServer | None = None
        self._fake: object | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        # fakeredis over TCP is dependable with RESP2 only; redis-server speaks either.
        suffix = "?protocol=2" if self.kind == "fakeredis" else ""
        return f"redis://127.0.0.1:{self.port}/0{suffix}"

    def describe(self) -> str:
        if self.kind == "redis-server":
            return f"embedded Redis: a child redis-server on {self.url} (nothing persisted)"
        return f"embedded Redis: in-process fakeredis on {self.url} (no redis-server on PATH)"

    def start(self) -> None:
        if self.kind == "redis-server":
            self._child = RedisServer()
            self._child.start()
            self.port = self._child.port
            return
        from fakeredis import TcpFakeServer

        self.port = free_port()
        server = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
        server.daemon_threads = True
        self._fake = server
        self._thread = threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None
        if self._fake is not None:
            self._fake.shutdown()  # type: ignore[attr-defined]
            self._fake.server_close()  # type: ignore[attr-defined]
            self._fake = None
            if self._thread is not None:
                self._thread.join(5)
