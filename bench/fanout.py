"""Fan-out: events/s delivered end to end to WebSocket clients, their latency, and what the
gateway can deliver at most.

The path measured is upstream -> worker -> Redis -> gateway -> WebSocket client, in shapes:

- **a** -- 1 session followed by ``--clients`` WebSocket clients (default 1,000): the gateway's
  fan-out of one live channel, **at capacity**: the offered rate starts at ``--rate`` events/s
  and grows by ``--ramp-factor`` per window until a window falls behind (deliveries under
  ``--keep-up`` of those offered, a p99 over ``--ramp-p99-ms``, or a client closed), for the
  gateway and for the baseline alike. The report gives each one's maximum deliveries/s and the
  CPU per delivery of what serves the clients (``--no-ramp``: one window at ``--rate``).
- **b** -- ``--sessions`` sessions (default 1,000) with one WebSocket client each, ``--rate-b``
  events/s per session (default 1: 1,000 events/s in all): many channels, for latency.
- **m** -- ``--mux-sessions`` sessions (default 10,000) with one client each, over one WebSocket
  per session and then over ``--mux-connections`` (100) multiplexed ``/v1/stream``
  connections: the gateway's CPU per delivery and its memory (RSS before the clients and after
  the window) both ways. Events are published straight to Redis (XADD + SPUBLISH, as
  publish.lua does) at ``--mux-rate`` per session: only the gateway is measured. Not run by
  default (``--shapes m``).

Everything runs on loopback, each part in its own process: a private ``redis-server`` (never the
Redis on 6379); the bench's own upstream (:class:`Upstream`: a minimal asyncio SSE server that
spaces every session's events evenly, ``id: n`` / ``data: {"t": <time.time_ns()>, "n": n, ...}``,
stamped when written); one ``python -m workers``; one ``python -m gateway``; one client process
holding every WebSocket (asyncio + websockets); and a *tap*, one redis-py subscriber to the
sessions' live channels in a process of its own, which times the worker hop (upstream ->
PUBLISH) so that latency can be split between the worker and the gateway. After ``--warmup``
seconds, over ``--seconds``, the clients count the events they receive (deliveries/s summed
over clients) and the latency from the upstream's stamp to receipt (``time.time_ns()`` on both
sides: CLOCK_REALTIME is one clock on one machine). Every client checks that its seqs are
consecutive from 1 (gaps and duplicates must be 0). WebSocket compression follows the gateway's
default (off); ``--compression`` turns permessage-deflate on everywhere: offered by the clients
(as browsers do), accepted by the gateway (``LP_WS_COMPRESSION=true``) and by the baseline.

**Baseline**, in the same run, per shape, with the same client harness in its own process:

- shape a: a bare ``websockets`` server (``fanout.py _broadcast``: no Redis, no gateway, same
  compression) that sends the same envelopes to every client of the session with one
  ``broadcast()`` per event, at the same rates: what the gateway's fan-out costs over the
  WebSocket library alone.
- shape b: the "no gateway" path of the latency target -- a publisher child doing ``XADD`` +
  ``PUBLISH`` of the same envelopes (same payload size, channels, rate and spacing) with
  redis-py pipelines, and one plain redis-py asyncio subscriber per client on a connection of
  its own. Its latency runs from the publisher's stamp to the subscriber.
- shape m: the two ways of connecting are compared with each other.

Ratios are ours / baseline. Figures come last, one per line::

    capacity_ratio_a: 0.81 (target >= 0.70 of the baseline's maximum deliveries/s) PASS

Exit status 0 even when a target is missed (this is a measurement); non-zero when the run itself
breaks. Every child is stopped on exit, Ctrl-C included, and dies with the bench even if the
bench is killed (``PR_SET_PDEATHSIG``).

    .venv/bin/python bench/fanout.py                            # shapes a,b; 1,000 clients
    .venv/bin/python bench/fanout.py --shapes a --clients 200 --rate 50 --no-ramp
    .venv/bin/python bench/fanout.py --shapes m --seconds 5
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
from dataclasses import dataclass, field, replace
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
SETTLE = 5.0  # after the clients are up, before the first window
CONNECT_BATCH = 100  # WebSocket handshakes / subscriptions in flight while connecting
TARGET_RATIO = 0.70
MUX_SESSIONS = 10_000
MUX_CONNECTIONS = 100  # 100 sessions per /v1/stream connection (LP_MAX_SESSIONS_PER_STREAM 256)
MUX_RATE = 0.1  # events/s per session: 1,000 events/s over 10,000 sessions
RAMP_FACTOR = 1.5  # shape a's offered rate grows by this much per window
RAMP_MAX_RATE = 500.0  # events/s: 500,000 deliveries/s to 1,000 clients
KEEP_UP = 0.95  # a window with fewer deliveries than this share of those offered fell behind
# ... or with a p99 latency above this. Not 100 ms: the one client process takes tens of ms to
# read the 1,000 messages of one event, so even the bare broadcast() server's p99 passes 100 ms
# at the ramp's first rate on a 2-core machine (178 ms at 10,000 deliveries/s, load 2). Every
# window's p99 is printed: a tighter bound can be read off the table, or set here.
RAMP_P99_MS = 1000.0
# p99 targets of shape b: up to 1,000 events/s, and above (10,000 events/s).
TARGET_P99_MS = 3.0
TARGET_P99_MS_HIGH = 10.0
HIGH_RATE = 1000.0
PROFILED = ("gateway", "worker")  # what --profile samples with py-spy
SHAPES = ("a", "b", "m")
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


class Pacer:
    """Calls ``emit`` with the range of events due: event ``k`` (counted from the last change of
    rate) is due ``k / per_second`` s after that change, one at a time when the loop keeps up.
    ``per_second`` may change while it runs (``rate`` on the child's stdin)."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.done = 0  # events handed to emit so far: the next one is event ``done``
        self._changed = True

    def set_rate(self, per_second: float) -> None:
        self.per_second = per_second
        self._changed = True

    async def run(self, emit: Callable[[range], Awaitable[None] | None]) -> None:
        loop = asyncio.get_running_loop()
        started = base = 0.0
        while True:
            if self._changed:
                self._changed, started, base = False, loop.time(), self.done
            due = int(base + (loop.time() - started) * self.per_second) + 1
            if due > self.done:
                pending = emit(range(self.done, due))
                if pending is not None:
                    await pending
                self.done = due
            await asyncio.sleep(
                max(0.0, started + (self.done - base) / self.per_second - loop.time())
            )


async def answer_commands(
    lines: asyncio.Queue[str], pacer: Pacer, emit: Callable[[range], Awaitable[None] | None],
    count: Callable[[], int], sessions: int,
) -> None:  # fmt: skip
    """Run ``pacer`` and answer stdin: ``count`` prints ``count()``; ``rate R`` sets R events/s
    per session (of ``sessions``) and prints ``ok``; anything else, or EOF, stops."""
    task = asyncio.create_task(pacer.run(emit))
    try:
        while (line := await lines.get()) == "count" or line.startswith("rate "):
            if task.done():
                task.result()  # raise what stopped it
            if line == "count":
                print(count(), flush=True)
            else:
                pacer.set_rate(float(line.split()[1]) * sessions)
                print("ok", flush=True)
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
    """Serve :class:`Upstream` on a free port; print ``port N``; start the events on ``go``;
    answer ``count`` and ``rate R``; exit on EOF or anything else."""
    return asyncio.run(_serve_upstream(prefix, sessions, rate, payload_bytes))


async def _serve_upstream(prefix: str, sessions: int, rate: float, payload_bytes: int) -> int:
    loop = asyncio.get_running_loop()
    lines = _stdin_lines(loop)
    upstream = Upstream(prefix, sessions, rate, payload_bytes)
    server = await loop.create_server(lambda: _UpstreamConn(upstream), "127.0.0.1", 0, backlog=4096)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    # Streams open (the sessions come up), but events start on "go", once the clients are
    # connected: a client joining later would first replay the history from the start.
    if await lines.get() != "go":
        return 1
    await answer_commands(
        lines, Pacer(rate * sessions), upstream.emit, lambda: upstream.emitted, sessions
    )
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

    try:
        await answer_commands(lines, Pacer(rate * len(sids)), emit, lambda: published, len(sids))
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

    await answer_commands(lines, Pacer(rate * sessions), emit, lambda: emitted, sessions)
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

    def start_window(self) -> None:
        """Count from now (a ramp measures one window per offered rate)."""
        self.in_window = [0] * len(self.in_window)
        for name in ("latencies", "tap_latencies", "stamps", "tap_stamps"):
            setattr(self, name, array("q"))
        self.measuring = True

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
    state: dict[str, Any] = {}
    batch = opts.batch
    if opts.mode == "stream":
        # Connection j follows sessions j, j + connections, ...: every session once.
        groups: list[Any] = [targets[j :: opts.connections] for j in range(opts.connections)]
        opener: Any = _open_stream
        reader: Any = _read_stream
        # As many subscriptions in flight as the one-per-session clients have handshakes.
        batch = max(1, opts.batch // max(len(g) for g in groups))
    else:
        groups = targets
        opener = _open_ws if opts.mode == "ws" else _open_redis
        reader = _read_ws if opts.mode == "ws" else _read_redis
    for start in range(0, len(groups), batch):
        chunk = range(start, min(start + batch, len(groups)))
        opened = await asyncio.gather(
            *(opener(opts, groups[i], state) for i in chunk), return_exceptions=True
        )
        for i, conn in zip(chunk, opened, strict=True):
            if isinstance(conn, BaseException):
                failures[f"{type(conn).__name__}: {conn}"[:120]] += 1
                continue
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
            tally.start_window()
            started = time.monotonic()
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


async def _open_stream(opts: argparse.Namespace, sids: list[str], state: dict[str, Any]) -> Any:
    """One ``/v1/stream`` WebSocket following ``sids``, once every one is ``subscribed``."""
    from websockets.asyncio.client import connect

    ws = await connect(
        f"ws://127.0.0.1:{opts.port}/v1/stream",
        compression=None if opts.no_compression else "deflate",
        ping_interval=None,
        close_timeout=1,
        open_timeout=30,
    )
    for sid in sids:  # (a list given to send() would be one fragmented message)
        await ws.send(json.dumps({"op": "subscribe", "sid": sid}))
    pending = set(sids)
    async with asyncio.timeout(60):
        while pending:
            frame = json.loads(await ws.recv())
            if frame.get("op") != "subscribed":
                raise rig.BenchError(f"/v1/stream: unexpected frame {frame}")
            pending.discard(frame["sid"])
    return ws


async def _read_stream(j: int, ws: Any, tally: Tally) -> None:
    """Events of every session of one ``/v1/stream`` connection, each tallied as its session's
    client (``{"sid":"x",<envelope without its brace>``)."""
    from websockets.exceptions import ConnectionClosed

    prefix = '{"sid":"'
    clock = time.time_ns
    try:
        async for message in ws:
            if not message.startswith(prefix):
                tally.notices += 1
                continue
            end = message.index('"', len(prefix))
            number = int(message[len(prefix) : end].rsplit("-", 1)[1])
            tally.on_message(number, "{" + message[end + 2 :], clock())
        tally.closed[f"close {ws.close_code}"] += 1
    except ConnectionClosed:
        tally.closed[f"close {ws.close_code}"] += 1
    except Exception as exc:
        tally.closed[type(exc).__name__] += 1


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
    memory: dict[str, int] = field(default_factory=dict)  # RSS bytes by what and when

    @property
    def rate(self) -> float:
        return self.deliveries / self.window if self.window > 0 else 0.0

    @property
    def expected(self) -> float:
        """Deliveries/s the source's actual emissions called for."""
        return self.emitted * self.shape.per_session / self.window if self.window > 0 else 0.0

    def fell_behind(self, opts: argparse.Namespace) -> bool:
        """Fewer deliveries than ``--keep-up`` of those offered, a p99 over ``--ramp-p99-ms``,
        or a client closed."""
        p99 = self.latency_ms.get("p99", math.inf)
        return (
            self.rate < opts.keep_up * self.shape.offered
            or p99 > opts.ramp_p99_ms
            or bool(self.closed)
        )

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

    def set_rate(self, per_session: float) -> None:
        rig.send_line(self.proc, f"rate {per_session}")
        if (answer := rig.read_line(self.proc, 30, f"{self.what} rate")) != "ok":
            raise rig.BenchError(f"{self.what}: unexpected answer to rate: {answer!r}")


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
    emitted_before = source.count()  # may wait on a busy source: before the CPU window
    listeners = [clients] if tap is None else [clients, tap]
    cpu_before = {name: rig.cpu_seconds(p) for name, p in processes.items()}
    started = time.monotonic()
    for proc in listeners:
        rig.send_line(proc, "start")
    time.sleep(opts.seconds)
    for proc in listeners:
        rig.send_line(proc, "stop")
    cpu_after = {name: rig.cpu_seconds(p) for name, p in processes.items()}
    elapsed = time.monotonic() - started
    emitted_after = source.count()
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


def ramp_rates(shape: Shape, opts: argparse.Namespace) -> list[float]:
    """The offered rates (events/s per session) of the windows: shape a's ramp, from ``--rate``
    up by ``--ramp-factor`` to ``--ramp-max-rate``; one window otherwise."""
    if shape.name != "a" or opts.no_ramp:
        return [shape.rate]
    rates = [shape.rate]
    while rates[-1] * opts.ramp_factor <= opts.ramp_max_rate:
        rates.append(round(rates[-1] * opts.ramp_factor, 3))
    return rates


def measure_steps(
    first: Run,
    clients: subprocess.Popen[bytes],
    source: Source,
    pids: dict[str, int],
    watch: dict[str, subprocess.Popen[bytes]],
    opts: argparse.Namespace,
    children: rig.Children,
    log_dir: Path,
    tap: subprocess.Popen[bytes] | None = None,
) -> list[Run]:
    """One window per rate of :func:`ramp_rates`, raising the source's rate between them, until
    a window falls behind (:meth:`Run.fell_behind`). ``first`` holds the set-up figures."""
    steps: list[Run] = []
    rates = ramp_rates(first.shape, opts)
    # Clients that joined while others were being connected start behind (from the history):
    # let that pass before the first window is judged.
    time.sleep(opts.settle)
    for rate in rates:
        if steps:
            source.set_rate(rate)
            step = Run(
                replace(first.shape, rate=rate), first.path, connected=first.connected,
                connect_failed=first.connect_failed, setup_seconds=first.setup_seconds,
            )  # fmt: skip
        else:
            step = first
        measure(step, clients, source, pids, watch, opts, children, log_dir, tap)
        steps.append(step)
        if len(rates) > 1:
            print(
                f"    {first.path} offered {step.shape.offered:>9,.0f}/s: delivered "
                f"{step.rate:>9,.0f}/s, p99 {fmt_ms(step, 'p99')} ms, closed {step.closed or 0}",
                flush=True,
            )
        if step.fell_behind(opts):
            break
    return steps


def spawn_clients(
    children: rig.Children,
    mode: str,
    port: int,
    shape: Shape,
    opts: argparse.Namespace,
    connections: int = 0,
) -> tuple[subprocess.Popen[bytes], int, int]:
    """The client process (``ws``: WebSockets to the gateway on ``port``; ``stream``:
    ``connections`` multiplexed ones; ``redis``: one subscriber per client; ``tap``: only the
    worker-hop pattern subscriber), once it is up."""
    args = [
        sys.executable, __file__, "_clients", "--mode", mode, "--port", str(port),
        "--prefix", shape.prefix, "--sessions", str(shape.sessions),
        "--per-session", str(shape.per_session), "--batch", str(opts.connect_batch),
        "--connections", str(connections),
    ]  # fmt: skip
    if opts.no_compression:
        args.append("--no-compression")
    if opts.dump:
        Path(opts.dump).mkdir(parents=True, exist_ok=True)
        side = {"ws": "gateway", "stream": "mux", "redis": "baseline", "tap": "worker-hop"}[mode]
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
) -> list[Run]:
    """Shape a: a bare websockets broadcast() server; shape b: Redis PUBLISH -> subscribers."""
    if shape.name == "a":
        return run_broadcast(children, shape, opts)
    return run_pubsub(children, server, shape, opts, log_dir)


def run_broadcast(children: rig.Children, shape: Shape, opts: argparse.Namespace) -> list[Run]:
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
        return measure_steps(
            run, clients, Source(source, "broadcast server"), pids, {"server": source},
            replace_profile(opts), children, Path(tempfile.gettempdir()),
        )  # fmt: skip
    finally:
        if clients is not None:
            rig.Children.stop(clients)
        rig.Children.stop(source)


def run_pubsub(
    children: rig.Children, server: Any, shape: Shape, opts: argparse.Namespace, log_dir: Path
) -> list[Run]:
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
        return measure_steps(
            run, clients, Source(publisher, "publisher"), pids, {"publisher": publisher},
            replace_profile(opts), children, log_dir,
        )  # fmt: skip
    finally:
        rig.Children.stop(clients)
        rig.Children.stop(publisher)


def replace_profile(opts: argparse.Namespace) -> argparse.Namespace:
    """``opts`` without ``--profile`` (the baseline has no gateway to profile)."""
    return argparse.Namespace(**{**vars(opts), "profile": ""})


def run_gateway(
    children: rig.Children, server: Any, shape: Shape, opts: argparse.Namespace, log_dir: Path
) -> list[Run]:
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
        gateway, port = rig.start_gateway(
            children, server.url, logs["gateway"], gateway_env(opts), wait=False
        )
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
        rig.send_line(upstream, "go")
        run.setup_seconds = time.monotonic() - started
        pids = {
            "redis": server.process.pid,
            "upstream": upstream.pid,
            "worker": worker.pid,
            "gateway": gateway.pid,
            "clients": clients.pid,
        }
        steps = measure_steps(
            run, clients, Source(upstream, "upstream"), pids,
            {"worker": worker, "gateway": gateway}, opts, children, log_dir, tap,
        )  # fmt: skip
    finally:
        for proc in reversed(procs):  # clients first: the gateway then drains at once
            rig.Children.stop(proc, timeout=10)
    for name, path in logs.items():
        steps[-1].log_problems.update(scan_log(name, path))
    return steps


def gateway_env(opts: argparse.Namespace) -> dict[str, str]:
    return {"LP_WS_COMPRESSION": "false" if opts.no_compression else "true"}


def run_mux(
    children: rig.Children,
    server: Any,
    shape: Shape,
    opts: argparse.Namespace,
    log_dir: Path,
    connections: int,
) -> Run:
    """Shape m: the gateway alone (a publisher child does XADD + SPUBLISH as publish.lua would;
    no worker, no upstream) serving ``shape.sessions`` sessions to one client each, over one
    WebSocket per session (``connections`` 0) or over ``connections`` multiplexed
    ``/v1/stream`` WebSockets. The gateway's RSS is read before the clients connect and after
    the window (``Run.memory``)."""
    import psutil

    run = Run(shape, f"{connections} x /v1/stream" if connections else "per session")
    procs: list[subprocess.Popen[bytes]] = []
    log = log_dir / f"gateway-m-{connections}.log"
    try:
        rig.flush(server.url)
        started = time.monotonic()
        sids = shape.sids()

        async def claim() -> None:
            sessions = rig.Sessions(server.url)
            try:  # no worker runs: the sessions stay pending, their keys are what matters
                await sessions.claim(sids, lambda sid: f"http://127.0.0.1:9/events/{sid}")
            finally:
                await sessions.aclose()

        asyncio.run(claim())
        gateway, port = rig.start_gateway(
            children,
            server.url,
            log,
            {**gateway_env(opts), "LP_MAX_CLIENTS": str(shape.clients + 100)},
        )
        procs.append(gateway)
        memory = psutil.Process(gateway.pid)
        run.memory["gateway_before"] = memory.memory_info().rss
        mode = "stream" if connections else "ws"
        clients, run.connected, run.connect_failed = spawn_clients(
            children, mode, port, shape, opts, connections
        )
        procs.append(clients)
        publisher = children.spawn(
            [
                sys.executable, __file__, "_publisher", "--redis-url", server.url,
                "--prefix", shape.prefix, "--sessions", str(shape.sessions),
                "--rate", str(shape.rate), "--payload-bytes", str(opts.payload_bytes),
            ]
        )  # fmt: skip
        procs.append(publisher)
        if rig.read_line(publisher, 30, "publisher start") != "ready":
            raise rig.BenchError("publisher: unexpected greeting")
        rig.send_line(publisher, "go")
        run.setup_seconds = time.monotonic() - started
        pids = {
            "redis": server.process.pid,
            "publisher": publisher.pid,
            "gateway": gateway.pid,
            "clients": clients.pid,
        }
        measure(
            run, clients, Source(publisher, "publisher"), pids,
            {"gateway": gateway, "publisher": publisher}, opts, children, log_dir,
        )  # fmt: skip
        run.memory["gateway_after"] = memory.memory_info().rss
    finally:
        for proc in reversed(procs):
            rig.Children.stop(proc, timeout=10)
    run.log_problems.update(scan_log("gateway", log))
    return run


def print_mux(runs: Sequence[Run]) -> None:
    shape = runs[0].shape
    print()
    print(
        f"shape m: {shape.sessions:,} sessions with one client each, {shape.rate:g} events/s per "
        f"session ({shape.events_per_s:,.0f} events/s, published straight to Redis: the gateway "
        "alone is measured)"
    )
    print(
        f"  {'clients over':<20} {'conns':>6} {'deliveries/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'gateway CPU':>11} {'us/delivery':>11} {'RSS before':>10} {'RSS after':>10} "
        f"{'per session':>11}"
    )
    for run in runs:
        before, after = run.memory["gateway_before"], run.memory["gateway_after"]
        print(
            f"  {run.path:<20} {run.connected:>6,} {run.rate:>12,.0f} {fmt_ms(run, 'p50'):>8} "
            f"{fmt_ms(run, 'p99'):>8} {run.cpu.get('gateway', 0):>10.0f}% "
            f"{fmt_us(cpu_per_delivery_us(run)):>11} {rig.mib(before):>10} {rig.mib(after):>10} "
            f"{rig.kib((after - before) / shape.sessions) + ' KiB':>11}"
        )
        print(
            f"    gaps {run.gaps}, dups {run.dups}, silent sessions {run.silent_clients}, closed "
            f"{run.closed or 0}, failed to connect {run.connect_failed}, set up in "
            f"{run.setup_seconds:.1f}s"
        )
        for problem, n in run.log_problems.most_common(4):
            print(f"    {n:>6} x {problem}")


def print_mux_figures(runs: Sequence[Run]) -> None:
    single, *multiplexed = runs
    for run in runs:
        tag = "per_session" if run is single else f"mux{run.connected}"
        before, after = run.memory["gateway_before"], run.memory["gateway_after"]
        rig.figure(f"m_{tag}_cpu_per_delivery", f"{fmt_us(cpu_per_delivery_us(run))} us", run.path)
        rig.figure(
            f"m_{tag}_memory_per_session",
            f"{rig.kib((after - before) / run.shape.sessions)} KiB",
            f"{run.path}: gateway RSS {rig.mib(before)} -> {rig.mib(after)}",
        )
        # At 0.1 events/s a session has about one event in a 10 s window: one that falls just
        # outside leaves it silent without anything being lost (gaps would show that).
        expected = run.shape.rate * run.window
        rig.figure(
            f"m_{tag}_seq_errors",
            f"{run.gaps} gaps, {run.dups} dups, {run.silent_clients} silent (of "
            f"{expected:.1f} events expected per session), {sum(run.closed.values())} closed, "
            f"{run.connect_failed} failed to connect",
            "target 0; silent sessions only count from 2 expected events",
            run.seq_errors == 0
            and not run.closed
            and run.connect_failed == 0
            and (run.silent_clients == 0 or expected < 2),
        )
    for run in multiplexed:
        ours, theirs = cpu_per_delivery_us(run), cpu_per_delivery_us(single)
        if ours and theirs:
            rig.figure(f"m_mux{run.connected}_cpu_ratio", f"{ours / theirs:.2f} of per session")


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


def serving_cpu(run: Run) -> float | None:
    """% of one core of what serves the clients: the gateway, or the bare broadcast server."""
    return run.cpu.get("gateway", run.cpu.get("server"))


def cpu_per_delivery_us(run: Run) -> float | None:
    cpu = serving_cpu(run)
    return None if cpu is None or run.rate <= 0 else cpu / 100 / run.rate * 1e6


def fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def best(steps: Sequence[Run]) -> Run:
    """The window with the most deliveries/s."""
    return max(steps, key=lambda run: run.rate)


def print_ramp(base_steps: Sequence[Run], our_steps: Sequence[Run]) -> None:
    print(
        f"  {'path':<9} {'offered/s':>10} {'delivered/s':>11} {'of offered':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'server CPU':>10} {'us/delivery':>11}  closed"
    )
    for run in (*base_steps, *our_steps):
        cpu = serving_cpu(run)
        print(
            f"  {run.path:<9} {run.shape.offered:>10,.0f} {run.rate:>11,.0f} "
            f"{run.rate / run.shape.offered:>9.0%} {fmt_ms(run, 'p50'):>8} "
            f"{fmt_ms(run, 'p99'):>8} {'-' if cpu is None else f'{cpu:.0f}%':>10} "
            f"{fmt_us(cpu_per_delivery_us(run)):>11}  {run.closed or 0}"
        )


def print_report(
    results: Sequence[tuple[list[Run], list[Run]]],
    opts: argparse.Namespace,
    machine: str,
    load: str,
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
    for base_steps, our_steps in results:
        base, ours = best(base_steps), best(our_steps)
        shape = ours.shape
        print()
        if len(base_steps) > 1 or len(our_steps) > 1:
            print(
                f"shape {shape.name}: {shape.sessions} session(s) x {shape.per_session} clients, "
                f"offered rate raised x{opts.ramp_factor:g} per window until deliveries fell "
                f"under {opts.keep_up:.0%} of those offered, p99 passed {opts.ramp_p99_ms:g} ms "
                "or a client was closed"
            )
            print_ramp(base_steps, our_steps)
            print("  each path's window with the most deliveries/s:")
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
        if (per := cpu_per_delivery_us(ours)) is not None:
            print(f"  gateway CPU per delivery: {per:.1f} us")
        for problem, n in our_steps[-1].log_problems.most_common(6):
            print(f"    {n:>6} x {problem}")
        for name, path in our_steps[-1].profiles.items():
            print(f"  {name} py-spy profile (raw, folded stacks) of the last window: {path}")
    print()
    for base_steps, our_steps in results:
        print_figures(base_steps, our_steps, opts)


def print_figures(base_steps: list[Run], our_steps: list[Run], opts: argparse.Namespace) -> None:
    base, ours = best(base_steps), best(our_steps)
    sh = ours.shape
    s = sh.name
    ratio = ours.rate / base.rate if base.rate > 0 else 0.0
    ramped = len(base_steps) > 1 or len(our_steps) > 1
    if ramped:
        rig.figure(
            f"offered_{s}",
            f"raised from {base_steps[0].shape.offered:,.0f} deliveries/s ({sh.per_session} "
            f"clients of {sh.sessions} session(s)), x{opts.ramp_factor:g} per window",
        )
        rig.figure(f"max_deliveries_{s}", f"{ours.rate:,.0f}/s at {sh.offered:,.0f}/s offered")
        rig.figure(
            f"baseline_max_deliveries_{s}",
            f"{base.rate:,.0f}/s at {base.shape.offered:,.0f}/s offered",
        )
        rig.figure(
            f"capacity_ratio_{s}",
            f"{ratio:.2f}",
            f"target >= {opts.target_ratio:.2f} of the baseline's maximum deliveries/s",
            ratio >= opts.target_ratio,
        )
        ours_us, base_us = cpu_per_delivery_us(ours), cpu_per_delivery_us(base)
        rig.figure(f"gateway_cpu_per_delivery_{s}", f"{fmt_us(ours_us)} us", "at its maximum")
        rig.figure(f"baseline_cpu_per_delivery_{s}", f"{fmt_us(base_us)} us", "broadcast() server")
    else:
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
        target = opts.target_p99_ms
        if target is None:
            target = TARGET_P99_MS if sh.events_per_s <= HIGH_RATE else TARGET_P99_MS_HIGH
        rig.figure(
            f"latency_p99_{s}",
            f"{p99:.2f} ms",
            f"target <= {target:g} ms at {sh.events_per_s:,.0f} events/s",
            p99 <= target,
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
    for steps in (base_steps, our_steps):
        # A ramp's last window may close clients on purpose (it fell behind): the others may not.
        judged = steps[:-1] if ramped and len(steps) > 1 and steps[-1].fell_behind(opts) else steps
        last = steps[-1]
        prefix = "baseline_" if last.path == "baseline" else ""
        gaps = sum(run.gaps for run in steps)
        dups = sum(run.dups for run in steps)
        rig.figure(
            f"{prefix}seq_errors_{s}",
            f"{gaps} gaps, {dups} dups over {last.connected} clients; "
            f"{sum(last.closed.values())} closed (last window), {last.connect_failed} failed to "
            f"connect, {max(run.silent_clients for run in judged)} silent",
            "target 0 but for the closes of a window that fell behind",
            all(run.clean for run in judged) and gaps + dups == 0,
        )
    if (cpu := ours.cpu.get("gateway")) is not None:
        rig.figure(f"gateway_cpu_{s}", f"{cpu:.0f}% of one core")


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
    cl.add_argument("--mode", choices=("ws", "stream", "redis", "tap"), required=True)
    cl.add_argument("--connections", type=int, default=0, help="stream: /v1/stream connections")
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
    parser.add_argument("--warmup", type=float, default=WARMUP, help="s before each window (3)")
    parser.add_argument(
        "--settle", type=float, default=SETTLE, help="s more before the first window (5)"
    )
    parser.add_argument(
        "--payload-bytes", type=int, default=PAYLOAD_BYTES, help="event data size (160)"
    )
    parser.add_argument(
        "--connect-batch", type=int, default=CONNECT_BATCH, help="handshakes in flight (100)"
    )
    parser.add_argument(
        "--compression",
        action="store_true",
        help="permessage-deflate: offered by the clients (as browsers do), on in the gateway "
        "(LP_WS_COMPRESSION=true) and in the baseline server (default: off, the gateway's default)",
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
    parser.add_argument(
        "--mux-sessions", type=int, default=MUX_SESSIONS, help=f"shape m sessions ({MUX_SESSIONS})"
    )
    parser.add_argument(
        "--mux-connections",
        type=int,
        default=MUX_CONNECTIONS,
        help=f"shape m: /v1/stream connections carrying them ({MUX_CONNECTIONS})",
    )
    parser.add_argument(
        "--mux-rate",
        type=float,
        default=MUX_RATE,
        help=f"shape m events/s per session ({MUX_RATE:g})",
    )
    parser.add_argument(
        "--no-ramp",
        action="store_true",
        help="shape a: one window at --rate instead of raising the rate until it falls behind",
    )
    parser.add_argument(
        "--ramp-factor", type=float, default=RAMP_FACTOR, help=f"rate x per window ({RAMP_FACTOR})"
    )
    parser.add_argument(
        "--ramp-max-rate",
        type=float,
        default=RAMP_MAX_RATE,
        help=f"shape a: the highest events/s the ramp offers ({RAMP_MAX_RATE:g})",
    )
    parser.add_argument(
        "--keep-up",
        type=float,
        default=KEEP_UP,
        help=f"a window falls behind under this share of the deliveries offered ({KEEP_UP})",
    )
    parser.add_argument(
        "--ramp-p99-ms",
        type=float,
        default=RAMP_P99_MS,
        help=f"... or over this p99 latency ({RAMP_P99_MS:g} ms)",
    )
    parser.add_argument("--target-ratio", type=float, default=TARGET_RATIO, help="(0.70)")
    parser.add_argument(
        "--target-p99-ms",
        type=float,
        default=None,
        help="shape b's p99 target (3 ms up to 1,000 events/s, 10 ms above)",
    )
    parser.add_argument(
        "--profile", default="", help="py-spy gateway and worker in each window into this dir"
    )
    parser.add_argument("--log-dir", default="", help="keep worker/gateway logs here")
    parser.add_argument(
        "--dump", default="", help="write every delivery's stamp and latency (CSV) in this dir"
    )
    opts = parser.parse_args(argv)
    if opts.child is None:
        opts.no_compression = not opts.compression
        shapes = [s.strip() for s in opts.shapes.split(",") if s.strip()]
        if not shapes or any(s not in SHAPES for s in shapes):
            parser.error(f"--shapes: a comma-separated subset of {','.join(SHAPES)}")
        opts.shape_list = shapes
        if min(opts.clients, opts.sessions, opts.mux_sessions, opts.mux_connections) < 1:
            parser.error("--clients/--sessions/--mux-sessions/--mux-connections must be >= 1")
        if min(opts.rate, opts.rate_b, opts.mux_rate) <= 0:
            parser.error("--rate/--rate-b/--mux-rate must be > 0")
        if opts.mux_connections > opts.mux_sessions:
            parser.error("--mux-connections must not exceed --mux-sessions")
        if opts.seconds <= 0 or opts.warmup < 0 or opts.settle < 0:
            parser.error("--seconds must be > 0, --warmup and --settle >= 0")
        if opts.ramp_factor <= 1 or not 0 < opts.keep_up <= 1 or opts.ramp_p99_ms <= 0:
            parser.error("--ramp-factor must be > 1, --keep-up in (0, 1], --ramp-p99-ms > 0")
    return opts


def shapes_of(opts: argparse.Namespace) -> list[Shape]:
    shapes = {
        "a": Shape("a", 1, opts.clients, opts.rate, "fan-a-"),
        "b": Shape("b", opts.sessions, 1, opts.rate_b, "fan-b-"),
        "m": Shape("m", opts.mux_sessions, 1, opts.mux_rate, "fan-m-"),
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
    results: list[tuple[list[Run], list[Run]]] = []
    mux_runs: list[Run] = []
    with rig.Rig(opts.log_dir, "lp-fanout-") as bench:
        server = bench.redis()
        print(f"redis {server.url}", flush=True)
        for shape in shapes:
            print(f"shape {shape.name}: {shape.describe()}", flush=True)
            if shape.name == "m":
                for connections in (0, opts.mux_connections):
                    mux = run_mux(bench.children, server, shape, opts, bench.log_dir, connections)
                    print(
                        f"  {mux.path}: {mux.rate:,.0f} deliveries/s, gateway "
                        f"{fmt_us(cpu_per_delivery_us(mux))} us/delivery",
                        flush=True,
                    )
                    mux_runs.append(mux)
                continue
            base_steps = run_baseline(bench.children, server, shape, opts, bench.log_dir)
            base = best(base_steps)
            print(
                f"  baseline: {base.rate:,.0f} deliveries/s, p99 {fmt_ms(base, 'p99')} ms",
                flush=True,
            )
            our_steps = run_gateway(bench.children, server, shape, opts, bench.log_dir)
            ours = best(our_steps)
            print(
                f"  gateway:  {ours.rate:,.0f} deliveries/s, p99 {fmt_ms(ours, 'p99')} ms",
                flush=True,
            )
            results.append((base_steps, our_steps))
        if results:
            print_report(results, opts, machine, load)
        if mux_runs:
            print_mux(mux_runs)
            print()
            print_mux_figures(mux_runs)
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
