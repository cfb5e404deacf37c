"""Fan-out: events/s delivered end to end to WebSocket clients, and their latency.

The path measured is upstream -> worker -> Redis -> gateway -> WebSocket client, in two shapes:

- **a** -- 1 session followed by ``--clients`` WebSocket clients (default 1,000) at ``--rate``
  events/s: the gateway's fan-out of one live channel.
- **b** -- ``--sessions`` sessions (default 1,000) with one WebSocket client each, ``--rate-b``
  events/s per session (default 1: 1,000 events/s in all): many channels.

Everything runs on loopback, each part in its own process: a private ``redis-server`` (never the
Redis on 6379); the bench's own upstream (:class:`Upstream`: a minimal asyncio SSE server that
spaces every session's events evenly, ``id: n`` / ``data: {"t": <time.time_ns()>, "n": n, ...}``,
stamped when written); one ``python -m workers``; one ``python -m gateway``; one client process
holding every WebSocket (asyncio + websockets, permessage-deflate offered as browsers do); and a
*tap*, one redis-py pattern subscriber to the sessions' live channels in a process of its own,
which times the worker hop (upstream -> PUBLISH) so that latency can be split between the worker
and the gateway. After ``--warmup`` seconds, over ``--seconds``, the clients count the events
they receive (deliveries/s summed over clients) and the latency from the upstream's stamp to
receipt (``time.time_ns()`` on both sides: CLOCK_REALTIME is one clock on one machine). Every
client checks that its seqs are consecutive from 1 (gaps and duplicates must be 0).

**Baseline**, in the same run, per shape, with the same client harness in its own process:

- shape a: a bare ``websockets`` server (``fanout.py _broadcast``: no Redis, no gateway, same
  permessage-deflate setting) that sends the same envelopes to every client of the session with
  one ``broadcast()`` per event, at the same rate: what the gateway's fan-out costs over the
  WebSocket library alone.
- shape b: the "no gateway" path of the latency target -- a publisher child doing ``XADD`` +
  ``PUBLISH`` of the same envelopes (same payload size, channels, rate and spacing) with
  redis-py pipelines, and one plain redis-py asyncio subscriber per client on a connection of
  its own. Its latency runs from the publisher's stamp to the subscriber.

Ratios are ours / baseline. Figures come last, one per line::

    fanout_ratio_a: 0.99 (target >= 0.70 of baseline deliveries/s) PASS

Exit status 0 even when a target is missed (this is a measurement); non-zero when the run itself
breaks. Every child is stopped on exit, Ctrl-C included, and dies with the bench even if the
bench is killed (``PR_SET_PDEATHSIG``).

    .venv/bin/python bench/fanout.py                            # shapes a,b; 1,000 clients
    .venv/bin/python bench/fanout.py --shapes a --clients 200 --rate 50
    .venv/bin/python bench/fanout.py --shapes b --profile /tmp/lp-prof --dump /tmp/lp-dump
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# bench/ is sys.path[0] when this file runs as a script.
import rig
from rig_upstreams import PAYLOAD_BYTES, SSE_HEAD

if TYPE_CHECKING:
    import psutil

WORKER_ID = "bench-fanout"
LEASE_TTL = 10.0
CLIENTS_A = 1000
SESSIONS_B = 1000
RATE_A = 10.0  # events/s of shape a's one session (x 1,000 clients = 10,000 deliveries/s)
RATE_B = 1.0  # events/s per session of shape b (x 1,000 sessions = 1,000 events/s)
SECONDS = 10.0
WARMUP = 3.0
CONNECT_BATCH = 100  # WebSocket handshakes / subscriptions in flight while connecting
TARGET_RATIO = 0.70
TARGET_P99_MS = 5.0
PROFILED = ("gateway", "worker")  # what --profile samples with py-spy
SHAPES = ("a", "b")
HISTORY_MAXLEN = 10_000  # the pool's default LP_HISTORY_MAXLEN, for the baseline's XADD
SEQ_PREFIX = '{"seq":'
T_MARK = '\\"t\\": '  # `"t": ` inside the envelope's JSON-escaped data string


def timed_payload(n: int, size: int) -> str:
    """Event data of about ``size`` bytes stamped with the current ``time.time_ns()``."""
    head = f'{{"t": {time.time_ns()}, "n": {n}, "pad": "'
    return head + "x" * max(size - len(head) - 2, 0) + '"}'


# ============================================================================================
# Children (run as `fanout.py _upstream` / `_publisher` / `_clients`)
# ============================================================================================
def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
    """Lines of stdin as a queue ('' once it closes), read on the loop without a thread."""
    lines: asyncio.Queue[str] = asyncio.Queue()
    buffer = bytearray()
    fd = sys.stdin.fileno()

    def on_stdin() -> None:
        data = os.read(fd, 4096)
        if not data:
            loop.remove_reader(fd)
            lines.put_nowait("")
            return
        buffer.extend(data)
        while (end := buffer.find(b"\n")) >= 0:
            lines.put_nowait(buffer[:end].decode().strip() or " ")
            del buffer[: end + 1]

    loop.add_reader(fd, on_stdin)
    return lines


async def pace(per_second: float, emit: Callable[[range], Awaitable[None] | None]) -> None:
    """Event ``k`` (0, 1, ...) is due at ``k / per_second`` s from now: call ``emit`` with the
    range of events due whenever the loop gets there (one at a time when it keeps up)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    done = 0
    while True:
        due = int((loop.time() - started) * per_second) + 1
        if due > done:
            pending = emit(range(done, due))
            if pending is not None:
                await pending
            done = due
        await asyncio.sleep(max(0.0, started + done / per_second - loop.time()))


async def answer_counts(lines: asyncio.Queue[str], task: asyncio.Task[None], count: Any) -> None:
    """Answer ``count`` lines with ``count()`` until stdin says anything else or closes."""
    try:
        while await lines.get() == "count":
            if task.done():
                task.result()  # raise what stopped it
            print(count(), flush=True)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _UpstreamConn(asyncio.Protocol):
    """One upstream connection: reads the request head, then the pacer writes events to it."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.head = bytearray()
        self.transport: asyncio.Transport | None = None
        self.index: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.index is not None or self.transport is None:
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > 65536:
                self.transport.close()
            return
        lines = self.head[:end].decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        sid = rest.partition(" ")[0].removeprefix("/events/")
        number = sid.removeprefix(self.upstream.prefix)
        if method != "GET" or not number.isdigit() or int(number) >= self.upstream.sessions:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        last = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "last-event-id" and value.strip().isdigit():
                last = int(value.strip())
        self.index = int(number)
        self.transport.write(SSE_HEAD)
        self.upstream.attach(self.index, self, last)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.index is not None:
            self.upstream.detach(self.index, self)


class Upstream:
    """SSE streams ``/events/{prefix}{i}`` for ``i < sessions``: ``rate`` events/s per session,
    all sessions' events evenly spaced (``rate x sessions`` per second, session ``k % sessions``
    gets event ``k``). Each event's data carries ``"t"``: ``time.time_ns()`` when written."""

    def __init__(self, prefix: str, sessions: int, rate: float, payload_bytes: int) -> None:
        self.prefix = prefix
        self.sessions = sessions
        self.rate = rate
        self.payload_bytes = payload_bytes
        self.conns: list[_UpstreamConn | None] = [None] * sessions
        self.last = [0] * sessions  # the last event number written to each session
        self.emitted = 0

    def attach(self, index: int, conn: _UpstreamConn, last: int) -> None:
        old = self.conns[index]
        if old is not None and old.transport is not None:
            old.transport.close()  # a reconnect replaces the old stream
        self.conns[index] = conn
        self.last[index] = last

    def detach(self, index: int, conn: _UpstreamConn) -> None:
        if self.conns[index] is conn:
            self.conns[index] = None

    def emit(self, due: range) -> None:
        from listenerpool.testing.upstream import EVENT_TYPES

        for k in due:
            i = k % self.sessions
            conn = self.conns[i]
            if conn is None or conn.transport is None or conn.transport.is_closing():
                continue  # not connected (yet): that session's event is not emitted
            n = self.last[i] = self.last[i] + 1
            event = EVENT_TYPES[(n - 1) % len(EVENT_TYPES)]
            data = timed_payload(n, self.payload_bytes)
            conn.transport.write(f"id: {n}\nevent: {event}\ndata: {data}\n\n".encode())
            self.emitted += 1


def upstream_child(prefix: str, sessions: int, rate: float, payload_bytes: int) -> int:
    """Serve :class:`Upstream` on a free port; print ``port N``; answer ``count`` with the
    events emitted so far; exit on EOF or anything else."""
    return asyncio.run(_serve_upstream(prefix, sessions, rate, payload_bytes))


async def _serve_upstream(prefix: str, sessions: int, rate: float, payload_bytes: int) -> int:
    loop = asyncio.get_running_loop()
    lines = _stdin_lines(loop)
    upstream = Upstream(prefix, sessions, rate, payload_bytes)
    server = await loop.create_server(lambda: _UpstreamConn(upstream), "127.0.0.1", 0, backlog=4096)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    pacer = asyncio.create_task(pace(rate * sessions, upstream.emit))
    await answer_counts(lines, pacer, lambda: upstream.emitted)
    server.close()
    return 0


def publisher_child(redis_url: str, sids: Sequence[str], rate: float, payload_bytes: int) -> int:
    """The baseline's source: XADD + PUBLISH of envelopes like the worker's, ``rate`` events/s
    per session, evenly spaced over all sessions as the upstream's, in one redis-py pipeline per
    batch due (one event when it keeps up). Prints ``ready``; starts on ``go``; answers
    ``count``; stops on EOF or anything else."""
    return asyncio.run(_publish(redis_url, sids, rate, payload_bytes))


async def _publish(redis_url: str, sids: Sequence[str], rate: float, payload_bytes: int) -> int:
    import redis.asyncio as aioredis

    from listenerpool.envelope import envelope_parts
    from listenerpool.keys import SessionKeys
    from listenerpool.testing.upstream import EVENT_TYPES

    loop = asyncio.get_running_loop()
    lines = _stdin_lines(loop)
    client = aioredis.Redis.from_url(redis_url)
    await client.ping()
    streams = [SessionKeys(sid).events for sid in sids]
    channels = [SessionKeys(sid).live for sid in sids]
    print("ready", flush=True)
    if await lines.get() != "go":
        return 1
    published = 0

    async def emit(due: range) -> None:
        nonlocal published
        async with client.pipeline(transaction=False) as pipe:
            for k in due:
                i, seq = k % len(sids), k // len(sids) + 1
                event = EVENT_TYPES[(seq - 1) % len(EVENT_TYPES)]
                data = timed_payload(seq, payload_bytes)
                fields = {"seq": seq, "epoch": 1, "event": event, "data": data, "uid": str(seq)}
                pipe.xadd(
                    streams[i], fields, id=f"{seq}-0", maxlen=HISTORY_MAXLEN, approximate=True
                )
                head, tail = envelope_parts(1, event, data, str(seq))
                pipe.spublish(channels[i], f"{head}{seq}{tail}")  # as publish.lua does
            await pipe.execute()
        published += len(due)

    pacer = asyncio.create_task(pace(rate * len(sids), emit))
    try:
        await answer_counts(lines, pacer, lambda: published)
    finally:
        await client.aclose()
    return 0


def broadcast_child(sessions: int, rate: float, payload_bytes: int, compression: bool) -> int:
    """Shape a's baseline source: a bare ``websockets`` server, no Redis, no gateway. Clients
    connect to ``/v1/sessions/{sid}/events`` (the gateway's path); once ``go`` arrives each
    session's envelopes (the same JSON as the gateway sends) go to its clients with one
    ``broadcast()`` per event, paced and spaced as the upstream's. Prints ``port N``; answers
    ``count``; stops on EOF or anything else."""
    return asyncio.run(_broadcast(sessions, rate, payload_bytes, compression))


async def _broadcast(sessions: int, rate: float, payload_bytes: int, compression: bool) -> int:
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    from listenerpool.envelope import envelope_parts
    from listenerpool.testing.upstream import EVENT_TYPES

    loop = asyncio.get_running_loop()
    lines = _stdin_lines(loop)
    followers: dict[str, set[ServerConnection]] = {}

    async def handler(ws: ServerConnection) -> None:
        sid = ws.request.path.rstrip("/").split("/")[-2] if ws.request else ""
        group = followers.setdefault(sid, set())
        group.add(ws)
        try:
            await ws.wait_closed()
        finally:
            group.discard(ws)

    server = await serve(
        handler, "127.0.0.1", 0, compression="deflate" if compression else None,
        ping_interval=None, max_queue=None,
    )  # fmt: skip
    port = next(iter(server.sockets)).getsockname()[1]
    print(f"port {port}", flush=True)
    if await lines.get() != "go":
        return 1
    sids = [f"fan-a-{i}" for i in range(sessions)]
    emitted = 0

    def emit(due: range) -> None:
        nonlocal emitted
        for k in due:
            i, seq = k % sessions, k // sessions + 1
            event = EVENT_TYPES[(seq - 1) % len(EVENT_TYPES)]
            head, tail = envelope_parts(1, event, timed_payload(seq, payload_bytes), str(seq))
            broadcast(followers.get(sids[i], ()), f"{head}{seq}{tail}")
            emitted += 1

    pacer = asyncio.create_task(pace(rate * sessions, emit))
    await answer_counts(lines, pacer, lambda: emitted)
    server.close()
    return 0


class Tally:
    """What the clients received: per-client seq checks, and the window's deliveries and
    latencies (ns)."""

    def __init__(self, n: int) -> None:
        self.last = [0] * n
        self.in_window = [0] * n
        self.gaps = 0  # seqs skipped (before the first one received too: seqs start at 1)
        self.dups = 0  # seqs received again or out of order
        self.notices = 0  # frames that are not envelopes (reset notices)
        self.closed: Counter[str] = Counter()  # connections that ended, by close code/error
        self.measuring = False
        self.latencies = array("q")
        self.tap_latencies = array("q")  # upstream stamp -> PUBLISH seen by the tap
        self.stamps = array("q")  # the source's stamps of ``latencies`` (for --dump)
        self.tap_stamps = array("q")

    def on_message(self, i: int, raw: str, now_ns: int) -> None:
        if not raw.startswith(SEQ_PREFIX):
            self.notices += 1
            return
        seq = int(raw[7 : raw.index(",", 7)])
        last = self.last[i]
        if seq != last + 1:
            if seq <= last:
                self.dups += 1
                return
            self.gaps += seq - last - 1
        self.last[i] = seq
        if self.measuring:
            at = raw.index(T_MARK) + len(T_MARK)
            stamp = int(raw[at : raw.index(",", at)])
            self.latencies.append(now_ns - stamp)
            self.stamps.append(stamp)
            self.in_window[i] += 1


def clients_child(opts: argparse.Namespace) -> int:
    """Open every client (WebSocket to the gateway, or redis-py subscriber), print ``up OK
    FAILED``, then on stdin: ``start`` / ``stop`` the window (``stop`` prints ``result
    {json}``), ``quit`` or EOF to exit."""
    return asyncio.run(_clients(opts))


async def _clients(opts: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    lines = _stdin_lines(loop)
    sids = [f"{opts.prefix}{i}" for i in range(opts.sessions)]
    targets = [] if opts.mode == "tap" else [sid for sid in sids for _ in range(opts.per_session)]
    tally = Tally(len(targets))
    readers: list[asyncio.Task[None]] = []
    failures: Counter[str] = Counter()
    opener = _open_ws if opts.mode == "ws" else _open_redis
    state: dict[str, Any] = {}
    for start in range(0, len(targets), opts.batch):
        chunk = range(start, min(start + opts.batch, len(targets)))
        opened = await asyncio.gather(
            *(opener(opts, targets[i], state) for i in chunk), return_exceptions=True
        )
        for i, conn in zip(chunk, opened, strict=True):
            if isinstance(conn, BaseException):
                failures[f"{type(conn).__name__}: {conn}"[:120]] += 1
                continue
            reader = _read_ws if opts.mode == "ws" else _read_redis
            readers.append(asyncio.create_task(reader(i, conn, tally)))
    for failure, n in failures.most_common(3):
        print(f"{n} x client failed: {failure}", file=sys.stderr)
    connected = len(readers)
    if opts.mode == "tap":
        readers.append(asyncio.create_task(_tap(opts, tally, subscribed := loop.create_future())))
        await asyncio.wait_for(subscribed, 30)
    # The objects made so far live until the end: keep them out of the collector's way, so the
    # instrument's own pauses stay small.
    gc.collect()
    gc.freeze()
    print(f"up {connected} {sum(failures.values())}", flush=True)
    started = 0.0
    while (line := await lines.get()) in ("start", "stop"):
        if line == "start":
            tally.measuring, started = True, time.monotonic()
            continue
        tally.measuring = False
        window = time.monotonic() - started
        if opts.dump and opts.mode == "tap":
            _dump(opts.dump, tally.tap_stamps, tally.tap_latencies)
        elif opts.dump:
            _dump(opts.dump, tally.stamps, tally.latencies)
        print("result " + json.dumps(_summary(tally, window, connected)), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no closing handshakes: the connections go with the process


async def _tap(opts: argparse.Namespace, tally: Tally, subscribed: asyncio.Future[None]) -> None:
    """The worker hop: one subscriber to every session's live channel (sharded channels take
    no patterns), timing the upstream's stamp -> the SPUBLISH reaching it (what the gateway's
    hub sees)."""
    import redis.asyncio as aioredis

    from listenerpool.keys import SessionKeys

    client = aioredis.Redis(host="127.0.0.1", port=opts.port)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    for i in range(opts.sessions):
        await pubsub.ssubscribe(SessionKeys(f"{opts.prefix}{i}").live)
    subscribed.set_result(None)
    clock = time.time_ns
    async for message in pubsub.listen():
        if message["type"] == "smessage" and tally.measuring:
            raw = message["data"].decode()
            at = raw.index(T_MARK) + len(T_MARK)
            stamp = int(raw[at : raw.index(",", at)])
            tally.tap_latencies.append(clock() - stamp)
            tally.tap_stamps.append(stamp)


async def _open_ws(opts: argparse.Namespace, sid: str, state: dict[str, Any]) -> Any:
    from websockets.asyncio.client import connect

    return await connect(
        f"ws://127.0.0.1:{opts.port}/v1/sessions/{sid}/events",
        compression=None if opts.no_compression else "deflate",
        ping_interval=None,
        close_timeout=1,
        open_timeout=30,
    )


async def _read_ws(i: int, ws: Any, tally: Tally) -> None:
    from websockets.exceptions import ConnectionClosed

    clock = time.time_ns
    try:
        async for message in ws:
            tally.on_message(i, message, clock())
        tally.closed[f"close {ws.close_code}"] += 1
    except ConnectionClosed:
        tally.closed[f"close {ws.close_code}"] += 1
    except Exception as exc:
        tally.closed[type(exc).__name__] += 1


async def _open_redis(opts: argparse.Namespace, sid: str, state: dict[str, Any]) -> Any:
    import redis.asyncio as aioredis

    from listenerpool.keys import SessionKeys

    if "client" not in state:  # one client; every PubSub holds a connection of its own
        pool = aioredis.ConnectionPool(
            host="127.0.0.1", port=opts.port, max_connections=opts.sessions * opts.per_session + 8
        )
        state["client"] = aioredis.Redis(connection_pool=pool)
    pubsub = state["client"].pubsub(ignore_subscribe_messages=True)
    await pubsub.ssubscribe(SessionKeys(sid).live)
    await pubsub.get_message(timeout=10)  # the subscribe confirmation
    return pubsub


async def _read_redis(i: int, pubsub: Any, tally: Tally) -> None:
    clock = time.time_ns
    try:
        async for message in pubsub.listen():
            if message["type"] == "smessage":
                tally.on_message(i, message["data"].decode(), clock())
        tally.closed["pubsub ended"] += 1
    except Exception as exc:
        tally.closed[type(exc).__name__] += 1


def _dump(path: str, stamps: Sequence[int], latencies: Sequence[int]) -> None:
    """One line per delivery: the source's stamp (ns since the epoch), latency (us)."""
    with open(path, "w", encoding="utf-8") as out:
        out.write("stamp_ns,latency_us\n")
        out.writelines(f"{t},{lat / 1000:.0f}\n" for t, lat in zip(stamps, latencies, strict=True))


def _spread_ms(latencies: Sequence[int]) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {}
    points = (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    return {name: _rank(ordered, q) / 1e6 for name, q in points}


def _summary(tally: Tally, window: float, connected: int) -> dict[str, Any]:
    return {
        "window": window,
        "deliveries": len(tally.latencies),
        "connected": connected,
        "latency_ms": _spread_ms(tally.latencies),
        "tap_ms": _spread_ms(tally.tap_latencies),
        "tapped": len(tally.tap_latencies),
        "min_per_client": min(tally.in_window, default=0),
        "max_per_client": max(tally.in_window, default=0),
        "silent_clients": sum(1 for n in tally.in_window if n == 0),
        "gaps": tally.gaps,
        "dups": tally.dups,
        "notices": tally.notices,
        "closed": dict(tally.closed),
    }


def _rank(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (``q`` in 0..100) of sorted ``ordered``."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# ============================================================================================
# The bench
# ============================================================================================
@dataclass
class Shape:
    name: str
    sessions: int
    per_session: int
    rate: float
    prefix: str

    @property
    def clients(self) -> int:
        return self.sessions * self.per_session

    @property
    def events_per_s(self) -> float:
        return self.rate * self.sessions

    @property
    def offered(self) -> float:
        """Deliveries/s if every event reaches every client."""
        return self.events_per_s * self.per_session

    def sids(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.sessions)]

    def describe(self) -> str:
        return (
            f"{self.sessions} session{'s' * (self.sessions != 1)} x {self.per_session} client"
            f"{'s' * (self.per_session != 1)} ({self.clients} clients), {self.rate:g} events/s "
            f"per session: offered {self.events_per_s:,.0f} events/s = {self.offered:,.0f} "
            "deliveries/s"
        )


@dataclass
class Run:
    """One measured window: ours (gateway) or the baseline."""

    shape: Shape
    path: str  # "gateway" or "baseline"
    window: float = 0.0
    deliveries: int = 0
    emitted: int = 0  # events the source emitted during the window
    latency_ms: dict[str, float] = field(default_factory=dict)
    tap_ms: dict[str, float] = field(default_factory=dict)  # upstream -> PUBLISH (worker hop)
    min_per_client: int = 0
    silent_clients: int = 0
    gaps: int = 0
    dups: int = 0
    notices: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    connected: int = 0
    connect_failed: int = 0
    setup_seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core over the window
    log_problems: Counter[str] = field(default_factory=Counter)
    profiles: dict[str, str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.deliveries / self.window if self.window > 0 else 0.0

    @property
    def expected(self) -> float:
        """Deliveries/s the source's actual emissions called for."""
        return self.emitted * self.shape.per_session / self.window if self.window > 0 else 0.0

    @property
    def seq_errors(self) -> int:
        return self.gaps + self.dups

    @property
    def clean(self) -> bool:
        return (
            self.seq_errors == 0
            and not self.closed
            and self.connect_failed == 0
            and self.silent_clients == 0
        )


class Source:
    """The upstream or the baseline publisher: a child answering ``count``."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str) -> None:
        self.proc = proc
        self.what = what

    def count(self) -> int:
        rig.send_line(self.proc, "count")
        return int(rig.read_line(self.proc, 30, f"{self.what} count"))


def _processes(pids: dict[str, int]) -> dict[str, psutil.Process]:
    import psutil

    return {name: psutil.Process(pid) for name, pid in pids.items()}


def _py_spy() -> str | None:
    for candidate in ("/tmp/pyspy/bin/py-spy", shutil.which("py-spy")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def measure(
    run: Run,
    clients: subprocess.Popen[bytes],
    source: Source,
    pids: dict[str, int],
    watch: dict[str, subprocess.Popen[bytes]],
    opts: argparse.Namespace,
    children: rig.Children,
    log_dir: Path,
    tap: subprocess.Popen[bytes] | None = None,
) -> None:
    """Warm up, then one window: the clients' tally (and the tap's), the source's emissions
    and the CPU time of every process. ``watch``: children that must still run at the end."""
    time.sleep(opts.warmup)
    processes = _processes(pids)
    profilers = []
    for name in PROFILED if opts.profile else ():
        if name not in pids:
            continue
        spy = _py_spy()
        if spy is None:
            raise rig.BenchError("--profile: py-spy not found (/tmp/pyspy/bin/py-spy or PATH)")
        Path(opts.profile).mkdir(parents=True, exist_ok=True)
        out = run.profiles[name] = str(Path(opts.profile) / f"{name}-{run.shape.name}.txt")
        with open(log_dir / f"py-spy-{name}-{run.shape.name}.log", "wb") as log:
            profilers.append(
                children.spawn(
                    [
                        spy, "record", "--pid", str(pids[name]), "--duration",
                        str(math.ceil(opts.seconds)), "--rate", "200", "--format", "raw",
                        "--output", out, "--nonblocking",
                    ],
                    log=log,
                )
            )  # fmt: skip
    cpu_before = {name: rig.cpu_seconds(p) for name, p in processes.items()}
    emitted_before = source.count()
    listeners = [clients] if tap is None else [clients, tap]
    for proc in listeners:
        rig.send_line(proc, "start")
    started = time.monotonic()
    time.sleep(opts.seconds)
    for proc in listeners:
        rig.send_line(proc, "stop")
    elapsed = time.monotonic() - started
    emitted_after = source.count()
    cpu_after = {name: rig.cpu_seconds(p) for name, p in processes.items()}
    words = rig.read_line(clients, 120, "client results").split(" ", 1)
    if words[0] != "result":
        raise rig.BenchError(f"client results: unexpected {words!r}")
    result = json.loads(words[1])
    run.window = result["window"]
    run.deliveries = result["deliveries"]
    run.emitted = emitted_after - emitted_before
    run.latency_ms = result["latency_ms"]
    if tap is not None:
        words = rig.read_line(tap, 120, "tap results").split(" ", 1)
        if words[0] != "result":
            raise rig.BenchError(f"tap results: unexpected {words!r}")
        run.tap_ms = json.loads(words[1])["tap_ms"]
    run.min_per_client = result["min_per_client"]
    run.silent_clients = result["silent_clients"]
    run.gaps, run.dups = result["gaps"], result["dups"]
    run.notices = result["notices"]
    run.closed = result["closed"]
    run.cpu = {name: 100 * (cpu_after[name] - cpu_before[name]) / elapsed for name in processes}
    for profiler in profilers:
        try:
            profiler.wait(opts.seconds + 30)
        except subprocess.TimeoutExpired:
            rig.Children.stop(profiler)
    for name, proc in watch.items():
        if proc.poll() is not None:
            raise rig.BenchError(f"{name} exited with {proc.returncode} during the window")


def spawn_clients(
    children: rig.Children, mode: str, port: int, shape: Shape, opts: argparse.Namespace
) -> tuple[subprocess.Popen[bytes], int, int]:
    """The client process (``ws``: WebSockets to the gateway on ``port``; ``redis``: one
    subscriber per client; ``tap``: only the worker-hop pattern subscriber), once it is up."""
    args = [
        sys.executable, __file__, "_clients", "--mode", mode, "--port", str(port),
        "--prefix", shape.prefix, "--sessions", str(shape.sessions),
        "--per-session", str(shape.per_session), "--batch", str(opts.connect_batch),
    ]  # fmt: skip
    if opts.no_compression:
        args.append("--no-compression")
    if opts.dump:
        Path(opts.dump).mkdir(parents=True, exist_ok=True)
        side = {"ws": "gateway", "redis": "baseline", "tap": "worker-hop"}[mode]
        args += ["--dump", str(Path(opts.dump).resolve() / f"{side}-{shape.name}.csv")]
    proc = children.spawn(args)
    words = rig.read_line(proc, 60 + shape.clients / 20, f"{mode} clients up").split()
    if len(words) != 3 or words[0] != "up":
        raise rig.BenchError(f"{mode} clients: unexpected {words!r}")
    if int(words[1]) == 0 and mode != "tap":
        raise rig.BenchError(f"{mode} clients: none connected ({words[2]} failed)")
    return proc, int(words[1]), int(words[2])


def run_baseline(
    children: rig.Children, server: Any, shape: Shape, opts: argparse.Namespace, log_dir: Path
) -> Run:
    """Shape a: a bare websockets broadcast() server; shape b: Redis PUBLISH -> subscribers."""
    if shape.name == "a":
        return run_broadcast(children, shape, opts)
    return run_pubsub(children, server, shape, opts, log_dir)


def run_broadcast(children: rig.Children, shape: Shape, opts: argparse.Namespace) -> Run:
    run = Run(shape, "baseline")
    started = time.monotonic()
    args = [
        sys.executable, __file__, "_broadcast", "--sessions", str(shape.sessions),
        "--rate", str(shape.rate), "--payload-bytes", str(opts.payload_bytes),
    ]  # fmt: skip
    if opts.no_compression:
        args.append("--no-compression")
    source, port = children.spawn_server(args, "broadcast server")
    clients = None
    try:
        clients, run.connected, run.connect_failed = spawn_clients(
            children, "ws", port, shape, opts
        )
        rig.send_line(source, "go")
        run.setup_seconds = time.monotonic() - started
        pids = {"server": source.pid, "clients": clients.pid}
        measure(
            run, clients, Source(source, "broadcast server"), pids, {"server": source},
            replace_profile(opts), children, Path(tempfile.gettempdir()),
        )  # fmt: skip
    finally:
        if clients is not None:
            rig.Children.stop(clients)
        rig.Children.stop(source)
    return run


def run_pubsub(
    children: rig.Children, server: Any, shape: Shape, opts: argparse.Namespace, log_dir: Path
) -> Run:
    run = Run(shape, "baseline")
    rig.flush(server.url)
    started = time.monotonic()
    clients, run.connected, run.connect_failed = spawn_clients(
        children, "redis", server.port, shape, opts
    )
    if run.connect_failed:
        raise rig.BenchError(f"baseline: {run.connect_failed} subscribers failed to connect")
    publisher = children.spawn(
        [
            sys.executable, __file__, "_publisher", "--redis-url", server.url,
            "--prefix", shape.prefix, "--sessions", str(shape.sessions),
            "--rate", str(shape.rate), "--payload-bytes", str(opts.payload_bytes),
        ]
    )  # fmt: skip
    try:
        if rig.read_line(publisher, 30, "publisher start") != "ready":
            raise rig.BenchError("publisher: unexpected greeting")
        rig.send_line(publisher, "go")
        run.setup_seconds = time.monotonic() - started
        pids = {
            "redis": server.process.pid,
            "publisher": publisher.pid,
            "clients": clients.pid,
        }
        measure(
            run, clients, Source(publisher, "publisher"), pids, {"publisher": publisher},
            replace_profile(opts), children, log_dir,
        )  # fmt: skip
    finally:
        rig.Children.stop(clients)
        rig.Children.stop(publisher)
    return run


def replace_profile(opts: argparse.Namespace) -> argparse.Namespace:
    """``opts`` without ``--profile`` (the baseline has no gateway to profile)."""
    return argparse.Namespace(**{**vars(opts), "profile": ""})


def run_gateway(
    children: rig.Children, server: Any, shape: Shape, opts: argparse.Namespace, log_dir: Path
) -> Run:
    run = Run(shape, "gateway")
    procs: list[subprocess.Popen[bytes]] = []
    logs = {name: log_dir / f"{name}-{shape.name}.log" for name in ("worker", "gateway")}
    try:
        rig.flush(server.url)
        started = time.monotonic()
        upstream, upstream_port = children.spawn_server(
            [
                sys.executable, __file__, "_upstream", "--prefix", shape.prefix,
                "--sessions", str(shape.sessions), "--rate", str(shape.rate),
                "--payload-bytes", str(opts.payload_bytes),
            ],
            "upstream",
        )  # fmt: skip
        procs.append(upstream)
        worker = rig.start_worker(
            children, server.url, worker_id=WORKER_ID, capacity=max(shape.sessions, 1),
            lease_ttl=opts.lease_ttl, log_path=logs["worker"], wait=False,
        )  # fmt: skip
        procs.append(worker)
        # Both start at once; then the waits.
        gateway, port = rig.start_gateway(children, server.url, logs["gateway"], wait=False)
        procs.append(gateway)
        rig.wait_worker(worker, server.url, WORKER_ID, logs["worker"])
        rig.wait_gateway(gateway, port, logs["gateway"])
        rig.claim_and_wait(
            server.url, shape.sids(), lambda sid: f"http://127.0.0.1:{upstream_port}/events/{sid}",
            lease_ttl=opts.lease_ttl, timeout=opts.bringup_timeout, workers=[worker],
        )  # fmt: skip
        clients, run.connected, run.connect_failed = spawn_clients(
            children, "ws", port, shape, opts
        )
        procs.append(clients)
        tap = None
        if not opts.no_tap:
            tap = spawn_clients(children, "tap", server.port, shape, opts)[0]
            procs.append(tap)
        run.setup_seconds = time.monotonic() - started
        pids = {
            "redis": server.process.pid,
            "upstream": upstream.pid,
            "worker": worker.pid,
            "gateway": gateway.pid,
            "clients": clients.pid,
        }
        measure(
            run, clients, Source(upstream, "upstream"), pids,
            {"worker": worker, "gateway": gateway}, opts, children, log_dir, tap,
        )  # fmt: skip
    finally:
        for proc in reversed(procs):  # clients first: the gateway then drains at once
            rig.Children.stop(proc, timeout=10)
    for name, path in logs.items():
        run.log_problems.update(scan_log(name, path))
    return run


def scan_log(name: str, path: Path) -> Counter[str]:
    """Problem lines of a child's log: the worker's warnings, errors and tracebacks; every line
    of the gateway's (it logs at WARNING)."""
    found: Counter[str] = Counter()
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            text = line.strip()
            if not text or text == "warnings.warn(":
                continue
            if text.startswith("Traceback"):
                found[f"{name}: Traceback"] += 1
            elif name == "gateway" or any(f" {lv} " in text for lv in ("WARNING", "ERROR")):
                found[f"{name}: {text[:140]}"] += 1
    return found


# ============================================================================================
# Report
# ============================================================================================
def fmt_ms(run: Run, name: str) -> str:
    value = run.latency_ms.get(name)
    return "-" if value is None else f"{value:.2f}"


def print_report(
    results: Sequence[tuple[Run, Run]], opts: argparse.Namespace, machine: str, load: str
) -> None:
    print()
    print(f"fanout: events delivered end to end to WebSocket clients -- {machine}")
    print(f"(1-minute load average at the start and end of the run: {load}, {rig.load_average()})")
    print(f"(code under test: {code_fingerprint()})")
    print(
        "(gateway = upstream -> worker -> Redis -> gateway -> WebSocket; baseline a = bare "
        "websockets broadcast() server, same clients; baseline b = XADD+PUBLISH -> Redis -> one "
        "redis-py subscriber per client; latency = source's stamp -> receipt)"
    )
    for base, ours in results:
        shape = ours.shape
        print()
        print(f"shape {shape.name}: {shape.describe()}")
        header = (
            f"  {'path':<9} {'deliveries/s':>12} {'of emitted':>10} {'p50 ms':>8} {'p90 ms':>8} "
            f"{'p99 ms':>8} {'max ms':>8} {'gaps':>5} {'dups':>5} {'min/client':>10}"
        )
        print(header)
        for run in (base, ours):
            share = run.rate / run.expected if run.expected else 0.0
            print(
                f"  {run.path:<9} {run.rate:>12,.0f} {share:>9.1%} {fmt_ms(run, 'p50'):>8} "
                f"{fmt_ms(run, 'p90'):>8} {fmt_ms(run, 'p99'):>8} {fmt_ms(run, 'max'):>8} "
                f"{run.gaps:>5} {run.dups:>5} {run.min_per_client:>10}"
            )
        if ours.tap_ms:
            t = ours.tap_ms
            print(
                f"  {'(worker hop: upstream -> PUBLISH)':<45} {t['p50']:>8.2f} {t['p90']:>8.2f} "
                f"{t['p99']:>8.2f} {t['max']:>8.2f}"
            )
        for run in (base, ours):
            cpu = ", ".join(f"{name} {pct:.0f}" for name, pct in run.cpu.items())
            print(f"  {run.path} CPU % of one core over the window: {cpu}")
            print(
                f"  {run.path}: {run.connected} connected ({run.connect_failed} failed) and set "
                f"up in {run.setup_seconds:.1f}s; window {run.window:.1f}s, source emitted "
                f"{run.emitted / max(run.window, 1e-9):,.0f} events/s; closed during the run "
                f"{run.closed or 0}; silent clients {run.silent_clients}; notices {run.notices}"
            )
        if ours.rate > 0 and "gateway" in ours.cpu:
            per = ours.cpu["gateway"] / 100 / ours.rate * 1e6
            print(f"  gateway CPU per delivery: {per:.1f} us")
        for problem, n in ours.log_problems.most_common(6):
            print(f"    {n:>6} x {problem}")
        for name, path in ours.profiles.items():
            print(f"  {name} py-spy profile (raw, folded stacks): {path}")
    print()
    for base, ours in results:
        s = ours.shape.name
        ratio = ours.rate / base.rate if base.rate > 0 else 0.0
        sh = ours.shape
        rig.figure(
            f"offered_{s}",
            f"{sh.offered:,.0f} deliveries/s = {sh.rate:g} events/s x {sh.sessions} session(s) "
            f"x {sh.per_session} client(s) per session",
        )
        rig.figure(f"deliveries_{s}", f"{ours.rate:,.0f}/s")
        rig.figure(f"baseline_deliveries_{s}", f"{base.rate:,.0f}/s")
        if s == "a":
            rig.figure(
                f"fanout_ratio_{s}",
                f"{ratio:.2f}",
                f"target >= {opts.target_ratio:.2f} of baseline deliveries/s",
                ratio >= opts.target_ratio,
            )
        else:
            rig.figure(f"fanout_ratio_{s}", f"{ratio:.2f} of baseline deliveries/s")
        p99 = ours.latency_ms.get("p99", math.inf)
        if s == "b":
            events = ours.shape.events_per_s
            rig.figure(
                f"latency_p99_{s}",
                f"{p99:.2f} ms",
                f"target <= {opts.target_p99_ms:g} ms at {events:,.0f} events/s",
                p99 <= opts.target_p99_ms,
            )
        else:
            rig.figure(f"latency_p99_{s}", f"{p99:.2f} ms")
        rig.figure(f"latency_p50_{s}", f"{fmt_ms(ours, 'p50')} ms")
        rig.figure(f"latency_max_{s}", f"{fmt_ms(ours, 'max')} ms")
        rig.figure(f"baseline_latency_p99_{s}", f"{fmt_ms(base, 'p99')} ms")
        if ours.tap_ms:
            rig.figure(
                f"worker_hop_p99_{s}", f"{ours.tap_ms['p99']:.2f} ms", "info; upstream -> PUBLISH"
            )
        for run in (base, ours):
            prefix = "baseline_" if run is base else ""
            rig.figure(
                f"{prefix}seq_errors_{s}",
                f"{run.gaps} gaps, {run.dups} dups over {run.connected} clients; "
                f"{sum(run.closed.values())} closed, {run.connect_failed} failed to connect, "
                f"{run.silent_clients} silent",
                "target 0",
                run.clean,
            )
        if "gateway" in ours.cpu:
            rig.figure(f"gateway_cpu_{s}", f"{ours.cpu['gateway']:.0f}% of one core")


# ============================================================================================
# Main
# ============================================================================================
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    sub = parser.add_subparsers(dest="child")  # internal: the child processes
    up = sub.add_parser("_upstream")
    up.add_argument("--prefix", required=True)
    up.add_argument("--sessions", type=int, required=True)
    up.add_argument("--rate", type=float, required=True)
    up.add_argument("--payload-bytes", type=int, default=PAYLOAD_BYTES)
    pub = sub.add_parser("_publisher")
    pub.add_argument("--redis-url", required=True)
    pub.add_argument("--prefix", required=True)
    pub.add_argument("--sessions", type=int, required=True)
    pub.add_argument("--rate", type=float, required=True)
    pub.add_argument("--payload-bytes", type=int, default=PAYLOAD_BYTES)
    bc = sub.add_parser("_broadcast")
    bc.add_argument("--sessions", type=int, required=True)
    bc.add_argument("--rate", type=float, required=True)
    bc.add_argument("--payload-bytes", type=int, default=PAYLOAD_BYTES)
    bc.add_argument("--no-compression", action="store_true")
    cl = sub.add_parser("_clients")
    cl.add_argument("--mode", choices=("ws", "redis", "tap"), required=True)
    cl.add_argument("--port", type=int, required=True)
    cl.add_argument("--prefix", required=True)
    cl.add_argument("--sessions", type=int, required=True)
    cl.add_argument("--per-session", type=int, required=True)
    cl.add_argument("--batch", type=int, default=CONNECT_BATCH)
    cl.add_argument("--no-compression", action="store_true")
    cl.add_argument("--dump", default="")

    parser.add_argument("--shapes", default="a,b", help="a = 1 session x N clients, b = N x 1")
    parser.add_argument("--clients", type=int, default=CLIENTS_A, help="shape a clients (1000)")
    parser.add_argument("--sessions", type=int, default=SESSIONS_B, help="shape b sessions (1000)")
    parser.add_argument(
        "--rate", type=float, default=RATE_A, help=f"shape a events/s of its session ({RATE_A:g})"
    )
    parser.add_argument(
        "--rate-b", type=float, default=RATE_B, help=f"shape b events/s per session ({RATE_B:g})"
    )
    parser.add_argument("--seconds", type=float, default=SECONDS, help="measured window (10)")
    parser.add_argument("--warmup", type=float, default=WARMUP, help="s before the window (3)")
    parser.add_argument(
        "--payload-bytes", type=int, default=PAYLOAD_BYTES, help="event data size (160)"
    )
    parser.add_argument(
        "--connect-batch", type=int, default=CONNECT_BATCH, help="handshakes in flight (100)"
    )
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="WebSocket clients without permessage-deflate (browsers offer it: default on)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=LEASE_TTL,
        help="LP_LEASE_TTL of the worker and the claims (10, the default; renewals every ttl/3)",
    )
    parser.add_argument(
        "--no-tap",
        action="store_true",
        help="no pattern subscriber timing the worker hop (upstream -> PUBLISH)",
    )
    parser.add_argument(
        "--bringup-timeout", type=float, default=120.0, help="max s to all listening (120)"
    )
    parser.add_argument("--target-ratio", type=float, default=TARGET_RATIO, help="(0.70)")
    parser.add_argument("--target-p99-ms", type=float, default=TARGET_P99_MS, help="(5)")
    parser.add_argument(
        "--profile", default="", help="py-spy gateway and worker in each window into this dir"
    )
    parser.add_argument("--log-dir", default="", help="keep worker/gateway logs here")
    parser.add_argument(
        "--dump", default="", help="write every delivery's stamp and latency (CSV) in this dir"
    )
    opts = parser.parse_args(argv)
    if opts.child is None:
        shapes = [s.strip() for s in opts.shapes.split(",") if s.strip()]
        if not shapes or any(s not in SHAPES for s in shapes):
            parser.error(f"--shapes: a comma-separated subset of {','.join(SHAPES)}")
        opts.shape_list = shapes
        if min(opts.clients, opts.sessions) < 1 or min(opts.rate, opts.rate_b) <= 0:
            parser.error("--clients/--sessions must be >= 1 and --rate/--rate-b > 0")
        if opts.seconds <= 0 or opts.warmup < 0:
            parser.error("--seconds must be > 0 and --warmup >= 0")
    return opts


def shapes_of(opts: argparse.Namespace) -> list[Shape]:
    shapes = {
        "a": Shape("a", 1, opts.clients, opts.rate, "fan-a-"),
        "b": Shape("b", opts.sessions, 1, opts.rate_b, "fan-b-"),
    }
    return [shapes[name] for name in opts.shape_list]


def code_fingerprint() -> str:
    """A short hash of the code under test (gateway/, workers/, listenerpool/ sources) and its
    newest file, so that runs can be matched to the code without version control."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(
        path
        for package in ("gateway", "workers", "listenerpool")
        for pattern in ("*.py", "*.lua")
        for path in (rig.ROOT / package).rglob(pattern)
    )
    for path in files:
        digest.update(str(path.relative_to(rig.ROOT)).encode() + b"\0" + path.read_bytes())
    newest = max(files, key=lambda path: path.stat().st_mtime)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(newest.stat().st_mtime))
    where = newest.relative_to(rig.ROOT)
    return f"sha256 {digest.hexdigest()[:12]} of {len(files)} files, newest {where} {stamp}"


def run(opts: argparse.Namespace) -> int:
    shapes = shapes_of(opts)
    rig.check_fd_limit(max(s.clients for s in shapes), "clients")
    machine = rig.machine_line()
    print(
        f"fanout bench: shapes {','.join(s.name for s in shapes)}, window {opts.seconds:g}s "
        f"after {opts.warmup:g}s warm-up, payload {opts.payload_bytes} B, WebSocket compression "
        f"{'off' if opts.no_compression else 'permessage-deflate'}, {machine}",
        flush=True,
    )
    load = rig.load_average()
    results: list[tuple[Run, Run]] = []
    with rig.Rig(opts.log_dir, "lp-fanout-") as bench:
        server = bench.redis()
        print(f"redis {server.url}", flush=True)
        for shape in shapes:
            print(f"shape {shape.name}: {shape.describe()}", flush=True)
            base = run_baseline(bench.children, server, shape, opts, bench.log_dir)
            print(
                f"  baseline: {base.rate:,.0f} deliveries/s, p99 {fmt_ms(base, 'p99')} ms",
                flush=True,
            )
            ours = run_gateway(bench.children, server, shape, opts, bench.log_dir)
            print(
                f"  gateway:  {ours.rate:,.0f} deliveries/s, p99 {fmt_ms(ours, 'p99')} ms",
                flush=True,
            )
            results.append((base, ours))
        print_report(results, opts, machine, load)
        if not opts.log_dir:
            print("(worker/gateway logs were in a temporary directory; keep with --log-dir)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child == "_upstream":
        return upstream_child(opts.prefix, opts.sessions, opts.rate, opts.payload_bytes)
    if opts.child == "_publisher":
        sids = [f"{opts.prefix}{i}" for i in range(opts.sessions)]
        return publisher_child(opts.redis_url, sids, opts.rate, opts.payload_bytes)
    if opts.child == "_broadcast":
        return broadcast_child(
            opts.sessions, opts.rate, opts.payload_bytes, not opts.no_compression
        )
    if opts.child == "_clients":
        return clients_child(opts)
    return rig.run_guarded(run, opts)


if __name__ == "__main__":
    sys.exit(main())
