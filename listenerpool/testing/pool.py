"""A whole pool in the test process: a gateway and one worker on one event loop, on fakeredis.

:class:`LocalPool` needs no Redis server: the data lives in an in-process fakeredis served on a
loopback port (Lua through lupa), and the gateway listens on a free loopback port, so a
backend's code under test talks to it exactly as to a real pool (``PoolClient``, HTTP,
WebSocket, SSE). The loop runs in a daemon thread, so sync and async tests (on any loop) can
use it alike.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import httpx

from listenerpool.cli.embedded import EmbeddedRedis
from listenerpool.client import Event, PoolClient
from listenerpool.settings import Settings, load_settings
from listenerpool.tasks import cancel_until_done
from listenerpool.testing.loopthread import CALL_TIMEOUT, LoopThread, Service
from listenerpool.testing.redis_server import free_port

__all__ = ["DEFAULTS", "LocalPool"]

#: Settings of a :class:`LocalPool` unless overridden: quick backoffs so scripted upstream
#: failures recover within a test.
DEFAULTS: Final[dict[str, Any]] = {"backoff_base": 0.05, "backoff_cap": 0.5, "log_level": "WARNING"}
_START_TIMEOUT: Final = 20.0


class LocalPool(Service):
    """Starts on :meth:`start` (or ``with``), stops on :meth:`stop`, forgetting all data.

    ``settings`` override :data:`DEFAULTS` and the environment's ``LP_*`` variables; the Redis
    URL, host and port are always the pool's own.
    """

    def __init__(self, **settings: Any) -> None:
        self._overrides = {**DEFAULTS, **settings}
        self._redis: EmbeddedRedis | None = None
        self._runner: LoopThread | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.settings: Settings | None = None

    @property
    def url(self) -> str:
        """The gateway's base URL, e.g. ``http://127.0.0.1:41234``."""
        if self.settings is None:
            raise RuntimeError("LocalPool is not started")
        return f"http://{self.settings.host}:{self.settings.port}"

    def client(self, **kwargs: Any) -> PoolClient:
        """A :class:`PoolClient` of this pool (the caller closes it)."""
        return PoolClient(self.url, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start Redis, the gateway and the worker; returns once the worker is registered."""
        from listenerpool.cli import launch

        redis = EmbeddedRedis(prefer="fakeredis")
        redis.start()
        self._redis = redis
        try:
            own = {"redis_url": redis.url, "host": "127.0.0.1", "port": free_port()}
            self.settings = load_settings(**{**self._overrides, **own})
            runner = LoopThread("listenerpool-local-pool")
            runner.start()
            self._runner = runner
            settings = self.settings

            async def launch_pool() -> None:
                self._stop = asyncio.Event()
                self._task = asyncio.create_task(launch.serve_up(settings, self._stop))

            runner.run(launch_pool())
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        with httpx.Client(base_url=self.url, timeout=2) as http:
            while True:
                if self._task is not None and self._task.done():
                    raise RuntimeError(f"the local pool stopped at start: {self._failure()}")
                try:
                    if http.get("/v1/workers").json().get("workers"):
                        return
                except (httpx.TransportError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the local pool did not start in {_START_TIMEOUT:g}s")
                time.sleep(0.02)

    def _failure(self) -> str:
        task = self._task
        if task is None or task.cancelled():
            return "cancelled"
        exc = task.exception()
        return repr(exc) if exc is not None else "no error"

    def stop(self) -> None:
        """Drain the worker, stop the gateway, end the loop and Redis. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            try:
                if self._stop is not None and self._task is not None:
                    stop, task = self._stop, self._task

                    async def finish() -> None:
                        stop.set()
                        await asyncio.wait([task], timeout=CALL_TIMEOUT - 1)
                        if not task.done():
                            await cancel_until_done(task)

                    runner.run(finish())
            finally:
                runner.stop()
        self._stop = self._task = None
        redis, self._redis = self._redis, None
        if redis is not None:
            redis.stop()

    # -- waiting -----------------------------------------------------------------------------
    async def wait_for_state(self, sid: str, *states: str, timeout: float = 10.0) -> dict[str, Any]:
        """Poll ``GET /v1/sessions/{sid}`` until its state is one of ``states``; returns that
        status. Raises ``AssertionError`` with the last status seen at the deadline."""
        wanted = set(states) or {"listening"}
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        async with self.client() as client:
            while True:
                try:
                    last = await client.status(sid)
                except Exception as exc:  # not created yet, or a moment of unavailability
                    last = {"error": str(exc)}
                if last.get("state") in wanted:
                    return last
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"session {sid!r} not in state {sorted(wanted)} after {timeout:g}s: {last}"
                    )
                await asyncio.sleep(0.02)

    async def wait_for_events(
        self, sid: str, count: int, *, after: int = 0, timeout: float = 10.0
    ) -> list[Event]:
        """The session's first ``count`` events after seq ``after``, read through the gateway
        like any client would. Raises ``AssertionError`` if they do not all come in time."""
        events: list[Event] = []
        if count <= 0:
            return events

        async def collect(client: PoolClient) -> None:
            async with client.events(sid, after=after) as stream:
                async for item in stream:
                    if isinstance(item, Event):
                        events.append(item)
                        if len(events) >= count:
                            return

        async with self.client() as client:
            # A task and a plain wait, not a timeout scope around the socket reads: a
            # cancellation landing inside the client library's own deadlines can be lost.
            task = asyncio.create_task(collect(client))
            done, _ = await asyncio.wait([task], timeout=timeout)
            if done:
                task.result()
            else:
                await cancel_until_done(task)
        if len(events) >= count:
            return events
        raise AssertionError(
            f"session {sid!r}: {len(events)} of {count} events after {timeout:g}s: "
            f"{[(e.seq, e.event) for e in events]}"
        )
