"""A Redis for single-node mode, when no ``LP_REDIS_URL`` is given.

A child ``redis-server`` on a free loopback port when the binary is on PATH; otherwise an
in-process fakeredis served over TCP (Lua through lupa), so the pool runs with no Redis
installed at all. Nothing is persisted in either case.

The child never outlives this process: it is stopped on the way out, and the kernel kills it
should this process die without unwinding (SIGKILL, a crash), see :class:`ChildRedis`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Final, Literal

import redis

from listenerpool import index
from listenerpool.redis_process import RedisServer, free_port
from listenerpool.service import Service

Kind = Literal["redis-server", "fakeredis"]

_PR_SET_PDEATHSIG: Final = 1


class ChildRedis(RedisServer):
    """A ``redis-server`` child that dies with this process.

    On Linux it gets ``PR_SET_PDEATHSIG`` (SIGKILL once the thread that started it is gone;
    only set when that is the main thread, which lives as long as the process). It runs in a
    session of its own, so a Ctrl-C in the terminal reaches this process alone, which drains its
    readers against a Redis still up and then stops it.
    """

    def process_options(self) -> dict[str, Any]:
        die_with_us = None
        if (
            sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread()
        ):
            die_with_us = _die_with(os.getpid())
        return {"start_new_session": True, "preexec_fn": die_with_us}


def _die_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn``: in the child before exec, ask for SIGKILL once ``parent`` is gone.
    libc is loaded here, in the parent: little should happen between fork and exec."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)

    return in_child


class EmbeddedRedis(Service):
    """Starts on :meth:`start`, stops (and forgets all data) on :meth:`stop`."""

    def __init__(self, prefer: Kind | None = None) -> None:
        self.kind: Kind = prefer or (
            "redis-server" if shutil.which("redis-server") else "fakeredis"
        )
        self.port = 0
        self._child: ChildRedis | None = None
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
            child = ChildRedis()
            try:
                child.start()
            except BaseException:
                child.stop()  # a failure or an interrupt mid-start must not leave it behind
                raise
            self._child = child
            self.port = child.port
        else:
            from fakeredis import TcpFakeServer

            self.port = free_port()
            server = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
            server.daemon_threads = True
            self._fake = server
            self._thread = threading.Thread(
                target=server.serve_forever, name="fakeredis", daemon=True
            )
            self._thread.start()
        try:
            with redis.Redis.from_url(self.url) as client:
                client.mset(index.markers_of_an_empty_redis())
        except BaseException:
            self.stop()  # started, but not as it should be: not left behind either
            raise

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
