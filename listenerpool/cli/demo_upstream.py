"""An AG-UI-style demo upstream: the SSE server the pool's demo and docs point sessions at.

It plays the runner of an agent. ``GET /events/{session_id}`` streams ``text/event-stream``
forever, one *run* after another (run ids increasing), each run being::

    RUN_STARTED, TEXT_MESSAGE_START, TEXT_MESSAGE_CONTENT x (run_events - 10),
    TEXT_MESSAGE_END, TOOL_CALL_START, TOOL_CALL_ARGS x 3, TOOL_CALL_END,
    STATE_SNAPSHOT, RUN_FINISHED

Wire contract of ``GET /events/{session_id}``:

* The body opens with ``retry: 2000``; then each event is one frame
  ``id: <n>\\nevent: <TYPE>\\ndata: <json>\\n\\n`` where ``n`` numbers the session's events from
  1 and ``<json>`` is one line (:func:`demo_event`).
* The stream is a pure function of ``(session_id, n)`` (and the app's ``run_events``), so it
  honours ``Last-Event-ID``: a request carrying ``Last-Event-ID: k`` (a non-negative decimal
  integer) continues at ``k + 1`` with exactly the frames an uninterrupted stream would have
  sent. A missing or unusable value starts at 1.
* Events are paced at ``rate`` per second per connection (the first at once), and a
  ``: heartbeat`` comment is sent every ``heartbeat`` seconds of the connection's life,
  interleaved with the events. Either may be ``math.inf`` (no pacing / no heartbeats).
* The body ends only when the client goes away or the server shuts down gracefully
  (:meth:`DemoUpstream.stop`, or cancelling :meth:`DemoUpstream.serve`): open streams then end
  cleanly, and a reader reconnects with ``Last-Event-ID`` like after any other drop.

``GET /healthz`` answers ``200 {"status": "ok"}``.

Event payloads use AG-UI field names (``type``, ``threadId`` = the session id, ``runId``,
``messageId``, ``role``, ``delta``, ``toolCallId``, ``toolCallName``, ``parentMessageId``,
``snapshot``). Beyond AG-UI, every payload also carries ``threadId``, ``runId`` and ``"seq": n``
so that a consumer can place any single event; strip them before validating against a strict
AG-UI schema. No timestamps are sent: they would break the determinism above.

Ways to run it:

* ``python -m listenerpool.cli.demo_upstream --port 8001`` (Ctrl-C or SIGTERM stops it gracefully);
* ``await serve_demo_upstream(port=8001)`` until cancelled;
* :class:`DemoUpstream`, which also tells the bound port when asked for port 0::

      async with DemoUpstream(port=0, rate=50) as upstream:
          url = upstream.events_url("session-1")  # http://127.0.0.1:<port>/events/session-1

* :func:`create_demo_app` to mount the Starlette app under a server of your own (its open
  streams then end only when their clients leave, so give that server a graceful-shutdown
  timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "DEFAULT_PORT",
    "MIN_RUN_EVENTS",
    "TOOL_CALL_ARGS_PER_RUN",
    "DemoUpstream",
    "create_demo_app",
    "demo_event",
    "main",
    "run_event_types",
    "serve_demo_upstream",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = 8001
#: ``TOOL_CALL_ARGS`` events per run: the tool's JSON arguments split into this many deltas.
TOOL_CALL_ARGS_PER_RUN: Final = 3
_FIXED_PER_RUN: Final = 7 + TOOL_CALL_ARGS_PER_RUN  # all but the TEXT_MESSAGE_CONTENT events
#: The smallest ``run_events``: a run with a one-word text message.
MIN_RUN_EVENTS: Final = _FIXED_PER_RUN + 1

_RETRY_MS: Final = 2000
_RETRY_FRAME: Final = f"retry: {_RETRY_MS}\n\n".encode()
_HEARTBEAT_FRAME: Final = b": heartbeat\n\n"
_SHUTDOWN_GRACE: Final = 5  # seconds uvicorn waits for connections before cancelling them
_TOOL_NAME: Final = "get_weather"

# The assistant's text: word deltas taken cyclically from this script, starting at the
# beginning of a sentence picked per (session, run).
_SENTENCES: Final = (
    "Let me look that up for you.",
    "I will ask the weather service for the latest forecast and update the dashboard.",
    "Streaming the answer word by word keeps the interface responsive while I work.",
    "Every run ends with a tool call and a fresh state snapshot,",
    "so a client that reconnects can always catch up.",
)
_WORDS: Final = tuple(word for sentence in _SENTENCES for word in sentence.split())
_SENTENCE_STARTS: Final = tuple(
    sum(len(s.split()) for s in _SENTENCES[:i]) for i in range(len(_SENTENCES))
)
_CITIES: Final = ("Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Reykjavik", "Auckland", "Quebec")
_CONDITIONS: Final = ("sunny", "cloudy", "light rain", "windy", "snow showers", "fog")


def _check_run_events(run_events: int) -> None:
    if run_events < MIN_RUN_EVENTS:
        raise ValueError(f"run_events must be at least {MIN_RUN_EVENTS}, got {run_events}")


def run_event_types(run_events: int = 40) -> tuple[str, ...]:
    """The AG-UI event types of one run, in order (``run_events`` of them)."""
    _check_run_events(run_events)
    return (
        ("RUN_STARTED", "TEXT_MESSAGE_START")
        + ("TEXT_MESSAGE_CONTENT",) * (run_events - _FIXED_PER_RUN)
        + ("TEXT_MESSAGE_END", "TOOL_CALL_START")
        + ("TOOL_CALL_ARGS",) * TOOL_CALL_ARGS_PER_RUN
        + ("TOOL_CALL_END", "STATE_SNAPSHOT", "RUN_FINISHED")
    )


def _run_seed(session_id: str, run: int) -> int:
    # A stable hash (unlike hash()), so every process streams the same events.
    digest = hashlib.blake2b(f"{session_id}\n{run}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def demo_event(session_id: str, n: int, *, run_events: int = 40) -> dict[str, Any]:
    """Event ``n`` (from 1) of session ``session_id``: its JSON-ready payload.

    A pure function: run ``r = (n - 1) // run_events + 1`` (``runId`` ``"run-<r>"``), position
    ``(n - 1) % run_events`` in :func:`run_event_types`. ``payload["type"]`` is the SSE event
    type; the payload ends with ``"seq": n``. Within a run the ``TEXT_MESSAGE_CONTENT`` deltas
    concatenate to the message text and the ``TOOL_CALL_ARGS`` deltas to a JSON object.
    """
    if n < 1:
        raise ValueError(f"events are numbered from 1, got {n}")
    types = run_event_types(run_events)
    run, index = divmod(n - 1, run_events)
    run += 1
    kind = types[index]
    seed = _run_seed(session_id, run)
    run_id = f"run-{run}"
    message_id = f"msg-{run}"
    tool_call_id = f"call-{run}"
    city = _CITIES[seed % len(_CITIES)]
    conditions = _CONDITIONS[(seed >> 8) % len(_CONDITIONS)]
    temperature = (seed >> 16) % 36 - 5
    args = json.dumps({"city": city, "unit": "celsius"}, separators=(",", ":"))
    first_args = types.index("TOOL_CALL_ARGS")

    payload: dict[str, Any] = {"type": kind, "threadId": session_id, "runId": run_id}
    if kind == "TEXT_MESSAGE_START":
        payload |= {"messageId": message_id, "role": "assistant"}
    elif kind == "TEXT_MESSAGE_CONTENT":
        word_index = index - 2
        start = _SENTENCE_STARTS[(seed >> 24) % len(_SENTENCE_STARTS)]
        word = _WORDS[(start + word_index) % len(_WORDS)]
        payload |= {"messageId": message_id, "delta": word if word_index == 0 else " " + word}
    elif kind == "TEXT_MESSAGE_END":
        payload["messageId"] = message_id
    elif kind == "TOOL_CALL_START":
        payload |= {
            "toolCallId": tool_call_id,
            "toolCallName": _TOOL_NAME,
            "parentMessageId": message_id,
        }
    elif kind == "TOOL_CALL_ARGS":
        part = index - first_args
        lo = len(args) * part // TOOL_CALL_ARGS_PER_RUN
        hi = len(args) * (part + 1) // TOOL_CALL_ARGS_PER_RUN
        payload |= {"toolCallId": tool_call_id, "delta": args[lo:hi]}
    elif kind == "TOOL_CALL_END":
        payload["toolCallId"] = tool_call_id
    elif kind == "STATE_SNAPSHOT":
        payload["snapshot"] = {
            "runCount": run,
            "lastRunId": run_id,
            "weather": {"city": city, "temperatureC": temperature, "conditions": conditions},
        }
    payload["seq"] = n
    return payload


def _frame(session_id: str, n: int, run_events: int) -> bytes:
    payload = demo_event(session_id, n, run_events=run_events)
    data = json.dumps(payload, separators=(",", ":"))  # ASCII-only, one line
    return f"id: {n}\nevent: {payload['type']}\ndata: {data}\n\n".encode()


def _resume_point(header: str | None) -> int:
    """The last event id a reader saw: ``Last-Event-ID`` if a decimal integer, else 0."""
    value = (header or "").strip()
    if value.isascii() and value.isdigit():
        with contextlib.suppress(ValueError):  # int() refuses absurdly long digit strings
            return int(value)
    return 0


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{name} must be positive (math.inf allowed), got {value}")


class _DemoRunner:
    """Config and open streams of one app; :meth:`close` ends every stream gracefully."""

    def __init__(self, *, rate: float, heartbeat: float, run_events: int) -> None:
        _check_positive("rate", rate)
        _check_positive("heartbeat", heartbeat)
        _check_run_events(run_events)
        self.rate = rate
        self.heartbeat = heartbeat
        self.run_events = run_events
        self._closed = False
        # One event per open stream, created on the stream's own loop, so the app has no
        # loop-bound state of its own.
        self._wakeups: set[asyncio.Event] = set()

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/events/{session_id:path}", self._events, methods=["GET"]),
                Route("/healthz", _healthz, methods=["GET"]),
            ]
        )

    def close(self) -> None:
        """End every open stream (and any later one) cleanly; call on the serving loop."""
        self._closed = True
        for wake in self._wakeups:
            wake.set()

    async def _events(self, request: Request) -> Response:
        session_id: str = request.path_params["session_id"]
        if not session_id:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        after = _resume_point(request.headers.get("last-event-id"))
        return StreamingResponse(
            self._stream(session_id, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(self, session_id: str, after: int) -> AsyncIterator[bytes]:
        wake = asyncio.Event()
        self._wakeups.add(wake)
        try:
            yield _RETRY_FRAME
            loop = asyncio.get_running_loop()
            start = loop.time()
            sent = 0  # events written on this connection
            beats = 0  # heartbeat slots used: beat k is due at start + k * heartbeat
            while not self._closed:
                event_at = start + sent / self.rate
                beat_at = start + (beats + 1) * self.heartbeat
                now = loop.time()
                delay = min(event_at, beat_at) - now
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await wake.wait()
                    continue
                if event_at <= beat_at:
                    sent += 1
                    yield _frame(session_id, after + sent, self.run_events)
                else:
                    # A writer held back by a slow reader skips the beats it missed.
                    beats = max(beats + 1, int((now - start) // self.heartbeat))
                    yield _HEARTBEAT_FRAME
                await asyncio.sleep(0)  # unpaced streams must still let the loop run
        finally:
            self._wakeups.discard(wake)


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_demo_app(
    *, rate: float = 5.0, heartbeat: float = 15.0, run_events: int = 40
) -> Starlette:
    """The demo upstream as a Starlette app (routes and wire contract: see the module docs).

    ``rate``: events per second per connection; ``heartbeat``: seconds between ``: heartbeat``
    comments; both positive, ``math.inf`` allowed. ``run_events``: events per run, at least
    :data:`MIN_RUN_EVENTS`. Raises ``ValueError`` otherwise.
    """
    return _DemoRunner(rate=rate, heartbeat=heartbeat, run_events=run_events).app()


class _Server(uvicorn.Server):
    """A uvicorn server that reports when it listens, ends the demo streams when it shuts
    down (else uvicorn would wait for them forever) and leaves signal handling to its host."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_listening: Callable[[], None],
        on_shutdown: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self._on_listening = on_listening
        self._on_shutdown = on_shutdown

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_listening()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn closes the listeners before its first await, so the streams woken here end
        # after new connections are already refused.
        self._on_shutdown()
        await super().shutdown(sockets=sockets)


class DemoUpstream:
    """One demo upstream server (uvicorn) on ``host:port``; ``port=0`` picks a free port.

    * :meth:`serve` binds, serves until :meth:`stop` is called or it is cancelled, then shuts
      down gracefully (listeners closed, open streams ended cleanly) and returns (or re-raises
      the cancellation). It may be called once. ``OSError`` if the address cannot be bound.
    * :attr:`port` is the bound port once :meth:`serve` has bound it (before that, the port
      asked for, or ``RuntimeError`` if that was 0); :meth:`wait_started` returns once it
      accepts connections.
    * ``async with DemoUpstream(...) as upstream:`` runs :meth:`serve` in a task, enters once
      listening, and on exit stops it and waits for it to end.

    Call :meth:`stop` on the loop that serves. uvicorn's loggers are left as they are and get
    no access log; signals are not captured (the host program decides what they do).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        rate: float = 5.0,
        heartbeat: float = 15.0,
        run_events: int = 40,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._bound_port: int | None = None
        self._runner = _DemoRunner(rate=rate, heartbeat=heartbeat, run_events=run_events)
        self.app = self._runner.app()
        self._server: _Server | None = None
        self._serve_called = False
        self._stop_requested = False
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (see the class docs for before that)."""
        if self._bound_port is not None:
            return self._bound_port
        if self._requested_port == 0:
            raise RuntimeError("port 0: the bound port is known once serve() has bound it")
        return self._requested_port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8001`` (a wildcard host is shown as loopback)."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def events_url(self, session_id: str) -> str:
        """The stream URL of ``session_id`` (percent-encoded, ``/`` included)."""
        return f"{self.url}/events/{quote(session_id, safe='')}"

    async def wait_started(self) -> None:
        """Return once the server accepts connections (never, if :meth:`serve` failed)."""
        await self._listening.wait()

    def stop(self) -> None:
        """Ask :meth:`serve` to shut down gracefully; idempotent, also before it started."""
        self._stop_requested = True
        if self._server is not None:
            self._server.should_exit = True

    async def serve(self, *, started: asyncio.Event | None = None) -> None:
        """Serve until :meth:`stop` or cancellation; ``started`` is also set once listening."""
        if self._serve_called:
            raise RuntimeError("serve() may be called once per DemoUpstream")
        self._serve_called = True
        if self._stop_requested:
            return
        sock = await _listen(self.host, self._requested_port)
        try:
            self._bound_port = sock.getsockname()[1]

            def listening() -> None:
                logger.info("demo upstream listening on %s", self.url)
                self._listening.set()
                if started is not None:
                    started.set()

            config = uvicorn.Config(
                self.app,
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=_SHUTDOWN_GRACE,
            )
            server = _Server(config, on_listening=listening, on_shutdown=self._runner.close)
            server.should_exit = self._stop_requested
            self._server = server
            task = asyncio.ensure_future(server.serve(sockets=[sock]))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                # Cancelled from outside: shut down gracefully, then let the cancellation out.
                server.should_exit = True
                await task
                raise
        finally:
            sock.close()  # uvicorn closes it too on a normal shutdown; closing twice is fine

    async def __aenter__(self) -> Self:
        task = asyncio.create_task(self.serve(), name=f"demo-upstream-{self.host}")
        self._task = task
        waiter = asyncio.create_task(self._listening.wait())
        try:
            await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            waiter.cancel()
        if not self._listening.is_set():
            await task  # raises what serve() raised
            raise RuntimeError("the demo upstream stopped before it started listening")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._task is not None:
            await self._task


async def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on the first address ``host`` resolves to: one socket, one port."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    return socket.create_server(address, family=family, backlog=2048)


async def serve_demo_upstream(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    rate: float = 5.0,
    heartbeat: float = 15.0,
    run_events: int = 40,
    started: asyncio.Event | None = None,
) -> None:
    """Serve the demo upstream until cancelled (then shut down gracefully and re-raise).

    ``started`` is set once the server accepts connections. With ``port=0`` use
    :class:`DemoUpstream` instead, which tells the port it bound.
    """
    upstream = DemoUpstream(host, port, rate=rate, heartbeat=heartbeat, run_events=run_events)
    await upstream.serve(started=started)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m listenerpool.cli.demo_upstream [--host H] [--port P] [--rate R] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m listenerpool.cli.demo_upstream",
        description="Serve AG-UI-style demo event streams at GET /events/{session_id}.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--rate", type=float, default=5.0, help="events/s per connection")
    parser.add_argument("--heartbeat", type=float, default=15.0, help="seconds between beats")
    parser.add_argument("--run-events", type=int, default=40, help="events per agent run")
    args = parser.parse_args(argv)
    try:
        upstream = DemoUpstream(
            args.host,
            args.port,
            rate=args.rate,
            heartbeat=args.heartbeat,
            run_events=args.run_events,
        )
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            loop.add_signal_handler(signal.SIGTERM, upstream.stop)
        await upstream.serve()

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C cancels serve(): a graceful stop
        asyncio.run(run())


if __name__ == "__main__":
    main()
