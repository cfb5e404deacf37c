"""Process entry points behind the CLI: a gateway, a worker, or both in one process (``up``),
with an embedded Redis when no ``LP_REDIS_URL`` is set.

The gateway and worker packages are imported here, lazily, so the core stays free of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

from listenerpool.cli.embedded import EmbeddedRedis
from listenerpool.collector import tune_collector
from listenerpool.connections import LEASE_CONNECTIONS, async_redis, listen_queue, sync_redis
from listenerpool.errors import ListenerPoolError
from listenerpool.settings import Settings
from listenerpool.tasks import cancel_until_done

log = logging.getLogger("listenerpool")

#: The exit status of a server that could not start, as uvicorn's own startup failure.
STARTUP_FAILURE: Final = 3
_START_TIMEOUT: Final = 20.0


class StartupError(ListenerPoolError):
    """A server could not start (its port is taken, its address unusable); one line, exit 3."""


@dataclass(frozen=True)
class Listener:
    """A port a command will listen on, and how its user picks another."""

    what: str
    host: str
    port: int
    flag: str
    variable: str | None = None

    def how_to_change(self) -> str:
        return self.flag + (f" (or {self.variable})" if self.variable else "")


def listeners_for(command: str, settings: Settings | None, args: Any) -> list[Listener]:
    """Every fixed port ``command`` will listen on (port 0 means a free one: never taken);
    ``upstream-demo`` needs no settings, the others do."""
    found: list[Listener] = []
    if command == "upstream-demo":
        found.append(Listener("the demo upstream", args.host, args.port, "--port"))
    elif settings is None:
        raise ValueError(f"`{command}` listens where its settings say")
    if settings is not None and command in ("gateway", "up", "demo"):
        found.append(
            Listener("the gateway", gateway_host(settings), settings.port, "--port", "LP_PORT")
        )
    if settings is not None and command in ("worker", "up", "demo") and settings.metrics_port:
        found.append(
            Listener(
                "the worker's metrics port",
                settings.host,
                settings.metrics_port,
                "--metrics-port",
                "LP_METRICS_PORT",
            )
        )
    if command == "demo" and args.upstream_port:
        found.append(
            Listener("the demo upstream", "127.0.0.1", args.upstream_port, "--upstream-port")
        )
    return [listener for listener in found if listener.port]


def gateway_host(settings: Settings) -> str:
    """The address the gateway binds: ``gateway.auth.listen_host``'s choice, without its
    warning, which the gateway logs once when it starts."""
    from gateway.auth import LOOPBACK, is_loopback

    if settings.api_tokens or is_loopback(settings.host):
        return settings.host
    return LOOPBACK


def check_ports(listeners: Sequence[Listener], note: str = "") -> None:
    """Raise :class:`StartupError` naming the first port that cannot be listened on (``note``
    appended to its message), so that the CLI can refuse before anything starts: a second
    ``listenerpool demo`` must not half start, nor send its sessions to whatever already
    answers on its gateway's port. Nothing connects to the ports.

    The ports are held together while checking, so two listeners asking for the same port clash
    here too; they are released before returning (the servers bind them again moments later).
    """
    held: list[socket.socket] = []
    try:
        for i, listener in enumerate(listeners):
            try:
                held += _bind(listener.host, listener.port)
            except OSError as exc:
                reason = _refusal(listener, exc, listeners[:i])
                raise StartupError(f"{reason}; {note}" if note else reason) from None
    finally:
        for sock in held:
            sock.close()


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to, bound as asyncio's
    ``create_server`` (uvicorn) binds them: ``SO_REUSEADDR``, so that a port whose previous
    user left connections in TIME_WAIT counts as free, and IPv6 sockets IPv6-only."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            # Listening, not just bound: two bound SO_REUSEADDR sockets do not clash.
            sock.listen(1)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _refusal(listener: Listener, exc: OSError, earlier: Sequence[Listener]) -> str:
    if exc.errno != errno.EADDRINUSE:
        where = f"{listener.host}:{listener.port}"
        return f"{listener.what} cannot listen on {where}: {exc.strerror or exc}"
    hint = f"choose another with {listener.how_to_change()}"
    spare = _spare_port(listener)
    if spare is not None:
        hint += f", e.g. {listener.flag} {spare}"
    rival = next((other for other in earlier if other.port == listener.port), None)
    if rival is not None:
        return f"port {listener.port} is asked for both {rival.what} and {listener.what}; {hint}"
    return f"port {listener.port} ({listener.what}, on {listener.host}) is already in use; {hint}"


def _spare_port(listener: Listener, tries: int = 20) -> int | None:
    """A nearby port that is free right now, to suggest (the caller still holds its other
    listeners' ports, so none of those is suggested)."""
    for port in range(listener.port + 1, min(listener.port + 1 + tries, 65536)):
        try:
            for sock in _bind(listener.host, port):
                sock.close()
        except OSError:
            continue
        return port
    return None


@contextlib.contextmanager
def redis_for(settings: Settings, announce: Callable[[str], None]) -> Iterator[Settings]:
    """``settings`` with a Redis URL: the configured one, or an embedded Redis for the duration."""
    if settings.redis_url:
        yield settings
        return
    with EmbeddedRedis() as embedded:
        announce(embedded.describe())
        yield settings.model_copy(update={"redis_url": embedded.url})


class DeferredSignals:
    """A SIGINT/SIGTERM handler for while no event loop handles them (the embedded Redis
    starting or stopping): it only notes the signal; :meth:`raise_if_received` and
    :func:`stop_on_signals` act on it at points where that is safe.

    Not raising from the handler itself is the point: an exception raised wherever the signal
    lands can leave a lock held. Landing in the fork hooks of a child's start, it is even
    swallowed with the logging lock taken, and the process hangs later on.
    """

    SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[DeferredSignals]:
        """Note signals for the duration (main thread only: elsewhere nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def raise_if_received(self) -> None:
        """What the signal would have done at once: ``KeyboardInterrupt`` for SIGINT,
        ``SystemExit(128 + signal)`` for SIGTERM."""
        if signal.SIGINT in self.received:
            raise KeyboardInterrupt
        if self.received:
            raise SystemExit(128 + self.received[0])


@contextlib.asynccontextmanager
async def stop_on_signals() -> AsyncIterator[asyncio.Event]:
    """An event set by the first SIGINT/SIGTERM (or already set, if :class:`DeferredSignals`
    noted one before); a second one cancels the caller's task, which skips the graceful drain but
    still runs its ``finally`` blocks (child processes stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    caller = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and caller is not None:
            log.warning("second signal: stopping without a graceful drain")
            caller.cancel()
        stop.set()

    # remove_signal_handler() leaves the default action behind (SIGTERM: die on the spot), so
    # the handlers from before are put back: the CLI's, which note a signal that comes while
    # the embedded redis-server is being stopped instead of orphaning it.
    if threading.current_thread() is not threading.main_thread():
        # Python delivers signals to the main thread only: a command run from another thread
        # (a test, an embedding application) is stopped by cancelling it, not by a signal.
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in DeferredSignals.SIGNALS}
    for sig in previous:
        loop.add_signal_handler(sig, on_signal)
    if any(isinstance(h, DeferredSignals) and h.received for h in previous.values()):
        stop.set()
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)


def gateway_server(
    settings: Settings, app: Any | None = None, *, started: asyncio.Event | None = None
) -> Any:
    """A uvicorn server for the gateway that leaves signal handling to the caller and sets
    ``started`` once it listens."""
    import uvicorn

    from gateway.app import create_app
    from gateway.auth import listen_host
    from gateway.streamproto import max_request_head_bytes
    from gateway.wsprotocol import GatewayWebSocketProtocol
    from listenerpool.logs import redact_server_logs

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and started is not None:
                started.set()

    config = uvicorn.Config(
        app or create_app(settings),
        host=listen_host(settings),
        port=settings.port,
        ws=GatewayWebSocketProtocol,
        # Off by default: compressing every frame for every client was a third of the gateway's
        # CPU at fan-out and doubled the memory of a connection (bench/README.md, fanout).
        ws_per_message_deflate=settings.ws_compression,
        # /v1/stream?sessions=...&token=... with a Last-Event-ID naming hundreds of sessions is
        # a long request head; h11's default limit (16 KiB) would refuse it before the route.
        h11_max_incomplete_event_size=max_request_head_bytes(settings.max_sessions_per_stream),
        # Longer than clients keep idle connections (httpx 5 s, nginx upstreams and cloud load
        # balancers 60 s): a server that closes first races a request sent on the connection at
        # that moment, which then fails with a connection reset instead of a response.
        timeout_keep_alive=settings.keep_alive,
        ws_ping_interval=settings.client_heartbeat,
        ws_ping_timeout=settings.client_heartbeat,
        log_level=settings.log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=3,
        # JSON lines need every logger on the root handler; uvicorn's own config adds its
        # console handlers instead.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )
    redact_server_logs()  # after Config, which (re)configures uvicorn's loggers
    return Server(config)


async def serve_gateway(
    settings: Settings, stop: asyncio.Event, started: asyncio.Event | None = None
) -> None:
    """A gateway until ``stop`` is set; :class:`StartupError` if it cannot start listening."""
    server = gateway_server(settings, started=started)
    tune_collector()  # the app and its imports are built: out of the collector's reach
    serving = asyncio.create_task(_serve_uvicorn(server, settings), name="uvicorn")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    server.should_exit = True
    await serving


async def _serve_uvicorn(server: Any, settings: Settings) -> None:
    try:
        await server.serve()
    except SystemExit:
        # uvicorn exits the process when it cannot start (its port taken since check_ports,
        # its lifespan failing). Raised from a task, that would escape the event loop and leave
        # the worker running without a gateway; an exception stops the rest in order instead.
        if server.started:
            raise
        listener = listeners_for("gateway", settings, None)
        check_ports(listener)  # raises the one-line reason when the port is the cause
        raise StartupError("the gateway did not start (its log above says why)") from None


async def serve_worker(settings: Settings, stop: asyncio.Event) -> None:
    """A worker until ``stop`` is set, with its status port when ``LP_METRICS_PORT`` is set."""
    from workers.open_files import fit_capacity
    from workers.status_server import StatusServer
    from workers.worker import Worker

    tune_collector()
    capacity = fit_capacity(settings.worker_capacity)
    if capacity != settings.worker_capacity:
        settings = settings.model_copy(update={"worker_capacity": capacity})
    redis = async_redis(settings)
    lease_redis = async_redis(settings, max_connections=LEASE_CONNECTIONS)
    sync = sync_redis(settings)
    try:
        worker = Worker(
            settings, redis=redis, lease_redis=lease_redis, queue=listen_queue(sync, settings)
        )
        if not settings.metrics_port:
            await worker.run(stop)
            return
        try:
            status = StatusServer(
                worker.metrics.registry, worker.healthy, settings.host, settings.metrics_port
            )
        except OSError as exc:  # its port taken since check_ports, as for the gateway
            check_ports(listeners_for("worker", settings, None))
            where = f"{settings.host}:{settings.metrics_port}"
            raise StartupError(
                f"the worker's metrics port cannot listen on {where}: {exc.strerror or exc}"
            ) from None
        with status:
            log.info("worker metrics on http://%s:%d/metrics", settings.host, status.port)
            await worker.run(stop)
    finally:
        await redis.aclose()
        await lease_redis.aclose()
        sync.close()


async def serve_up(
    settings: Settings, stop: asyncio.Event, started: asyncio.Event | None = None
) -> None:
    """A gateway and a worker on one loop until ``stop`` is set; the worker drains first.

    Either one ending (a gateway that cannot listen, a worker that cannot start) sets ``stop``
    so that the other stops too, then its error is raised: never half a pool. ``started`` is set
    once the gateway listens.
    """
    parts = [
        asyncio.create_task(serve_gateway(settings, stop, started), name="gateway"),
        asyncio.create_task(serve_worker(settings, stop), name="worker"),
    ]
    try:
        await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        await asyncio.wait(parts)
    except asyncio.CancelledError:
        # A second signal (or the owner cancelling): no drain, but both parts still unwind.
        for part in parts:
            await cancel_until_done(part)
        raise
    for part in parts:
        part.result()


async def until_signalled(coro: Any) -> None:
    """Run ``coro`` until it ends or SIGINT/SIGTERM arrives (then cancel it)."""
    async with stop_on_signals() as stop:
        task = asyncio.ensure_future(coro)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await cancel_until_done(task)


async def serve_command(command: str, settings: Settings, args: Any) -> None:
    """Run ``up``, ``gateway``, ``worker`` or ``demo`` until SIGINT/SIGTERM."""
    async with stop_on_signals() as stop:
        if stop.is_set():
            return  # stopped before it started
        if command == "gateway":
            log.info("gateway on http://%s:%d", settings.host, settings.port)
            await serve_gateway(settings, stop)
        elif command == "worker":
            await serve_worker(settings, stop)
        elif command == "up":
            print(f"gateway on http://{settings.host}:{settings.port}", flush=True)
            await serve_up(settings, stop)
        elif command == "demo":
            await serve_demo(
                settings, stop, sessions=args.sessions, upstream_port=args.upstream_port
            )
        else:
            raise ValueError(f"unknown command {command!r}")


async def serve_demo(
    settings: Settings, stop: asyncio.Event, *, sessions: int, upstream_port: int
) -> None:
    """``up`` plus the demo upstream and ``sessions`` sessions reading it."""
    from listenerpool.cli.demo_upstream import DemoUpstream
    from listenerpool.client import PoolClient

    listening = asyncio.Event()
    pool = asyncio.create_task(serve_up(settings, stop, listening), name="pool")
    base = f"http://{settings.host}:{settings.port}"
    try:
        # Sessions are sent only once this process's own gateway listens on its port: whatever
        # else answers there must not get them. The upstream starts after that, so that the
        # free port it is given cannot be the one the gateway is about to bind.
        if not await _gateway_listening(listening, pool) or stop.is_set():
            await pool
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                upstream = await stack.enter_async_context(DemoUpstream("127.0.0.1", upstream_port))
            except OSError as exc:
                where = f"127.0.0.1:{upstream_port}"
                raise StartupError(
                    f"the demo upstream cannot listen on {where}: {exc.strerror or exc}"
                ) from None
            sids = [f"demo-{i}" for i in range(1, sessions + 1)]
            try:
                async with PoolClient(base) as client:
                    for sid in sids:
                        await client.start(sid, upstream.events_url(sid))
            except Exception:
                if not stop.is_set():
                    raise
                await pool  # stopped by a signal meanwhile: the gateway went away
                return
            print(_demo_instructions(base, upstream.port, sids), flush=True)
            await pool  # the workers drain while the upstream still serves
    finally:
        if not pool.done():
            stop.set()
            await pool


async def _gateway_listening(
    listening: asyncio.Event, pool: asyncio.Task[None], timeout: float = _START_TIMEOUT
) -> bool:
    """True once the gateway listens; False if the pool was stopped first; else raises."""
    waiter = asyncio.create_task(listening.wait())
    try:
        await asyncio.wait([waiter, pool], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if pool.done():
        pool.result()  # the pool could not start: raise its error
        return False
    if not listening.is_set():
        raise StartupError(f"the gateway did not start listening within {timeout:g} s")
    return True


def _demo_instructions(base: str, upstream_port: int, sids: list[str]) -> str:
    first = sids[0] if sids else "demo-1"
    return f"""
listenerpool demo is running: gateway {base}, demo upstream http://127.0.0.1:{upstream_port}
sessions: {", ".join(sids)}

watch them:
  listenerpool status --gateway {base}
  listenerpool tail {first} --gateway {base}
  curl -N {base}/v1/sessions/{first}/events
  websocket: ws://{base.split("://", 1)[1]}/v1/sessions/{first}/events?after=0
start another:
  curl -X PUT {base}/v1/sessions/mine -H 'content-type: application/json' \\
       -d '{{"url": "http://127.0.0.1:{upstream_port}/events/mine"}}'
stop one:
  listenerpool cancel {first} --gateway {base}
Ctrl-C stops everything.
"""
