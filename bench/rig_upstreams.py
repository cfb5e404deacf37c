"""The upstreams the benches read from, each in a child process of its own so that the measured
processes hold nothing but what is measured.

- ``rig_upstreams.py _firehose`` serves ``GET /events/{sid}``: every connection gets ``--chunk``
  events per write (``id: n``, ``event: TEXT_MESSAGE_CONTENT``, ~``--payload-bytes`` of data),
  as fast as the socket drains (``--rate 0``), or ``--rate`` events/s per connection (evenly
  spread over connections). It prints ``port N`` and answers ``count`` on stdin with the number
  of events written and the connections ever opened (``EMITTED OPENED OPEN``).
- ``rig_upstreams.py _upstream`` is the test upstream (:class:`SSEUpstream`): idle streams
  (heartbeats every ``--heartbeat`` s, no events) or, with ``--rate``, numbered events resumed
  after ``Last-Event-ID``. It prints ``port N`` and answers ``count PREFIX`` on stdin with three
  numbers: open connections in total, open ones of sessions starting with PREFIX, and how many
  connections those sessions ever opened; ``events RATE PREFIX`` switches the streams of
  sessions starting with PREFIX to RATE numbered events/s (0: idle again) and answers
  ``events N``, the sessions switched. It exits on ``quit`` or EOF (the bench is gone).
  ``--host`` picks its loopback address; :class:`UpstreamSpread` runs several, one per address.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

# bench/ is sys.path[0] when a bench or this file runs as a script.
from rig import BenchError, Children, read_line, send_line

if TYPE_CHECKING:
    from listenerpool.testing.upstream import SSEUpstream

PAYLOAD_BYTES = 160
HEARTBEAT = 15.0
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Connection: close\r\n\r\n"
)


async def read_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
    """An HTTP request's head, or None (and the connection closed) when it does not come."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        writer.close()
        return None


# ============================================================================================
# The firehose
# ============================================================================================
class Firehose:
    """Counts what it emitted; each connection is one task in :meth:`serve`."""

    def __init__(self, rate: float, chunk: int, payload_bytes: int) -> None:
        self.rate = rate
        self.chunk = chunk
        self.pad = "x" * max(payload_bytes - 40, 0)
        self.emitted = 0
        self.opened = 0
        self.open = 0

    def event(self, n: int) -> bytes:
        return (
            f'id: {n}\nevent: TEXT_MESSAGE_CONTENT\ndata: {{"t": {time.time_ns()}, "n": {n}, '
            f'"pad": "{self.pad}"}}\n\n'
        ).encode()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader, writer)
        if head is None:
            return
        last = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "last-event-id" and value.strip().isdigit():
                last = int(value.strip())
        self.opened += 1
        self.open += 1
        n = last
        try:
            writer.write(SSE_HEAD)
            if self.rate > 0:
                # Spread connections over one period so that sessions do not emit in lockstep.
                period = 1.0 / self.rate
                await asyncio.sleep((self.opened * 0.6180339887 % 1.0) * period)
                loop = asyncio.get_running_loop()
                next_at = loop.time()
                while True:
                    n += 1
                    writer.write(self.event(n))
                    self.emitted += 1
                    next_at += period
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
            while True:
                writer.write(b"".join(self.event(n + i) for i in range(1, self.chunk + 1)))
                n += self.chunk
                self.emitted += self.chunk
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.open -= 1
            writer.close()


def firehose_child(rate: float, chunk: int, payload_bytes: int) -> int:
    return asyncio.run(_firehose(rate, chunk, payload_bytes))


async def _firehose(rate: float, chunk: int, payload_bytes: int) -> int:
    hose = Firehose(rate, chunk, payload_bytes)
    server = await asyncio.start_server(hose.serve, "127.0.0.1", 0, backlog=4096)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "count":
            break
        print(f"{hose.emitted} {hose.opened} {hose.open}", flush=True)
    server.close()
    os._exit(0)


class FirehoseProcess:
    def __init__(
        self,
        children: Children,
        *,
        rate: float = 0.0,
        chunk: int = 16,
        payload: int = PAYLOAD_BYTES,
    ) -> None:
        self.proc, self.port = children.spawn_server(
            [
                sys.executable, __file__, "_firehose", "--rate", str(rate), "--chunk", str(chunk),
                "--payload-bytes", str(payload),
            ],
            "upstream",
        )  # fmt: skip

    def url(self, sid: str) -> str:
        return f"http://127.0.0.1:{self.port}/events/{sid}"

    def count(self) -> tuple[int, int, int]:
        """(events emitted, connections ever opened, connections open)."""
        send_line(self.proc, "count")
        emitted, opened, open_ = read_line(self.proc, 30, "upstream count").split()
        return int(emitted), int(opened), int(open_)


# ============================================================================================
# The test upstream
# ============================================================================================
def upstream_child(heartbeat: float, rate: float, host: str) -> int:
    from listenerpool.testing.upstream import SSEUpstream

    if rate > 0:
        upstream = SSEUpstream(rate=rate, heartbeat=heartbeat, host=host)
    else:  # no events: heartbeats only
        upstream = SSEUpstream(total=0, heartbeat=heartbeat, host=host)
    upstream.start()
    print(f"port {upstream.port}", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "quit":
                break
            if words[0] == "events":  # events RATE [PREFIX]: numbered events, or 0 to go idle
                rate, prefix = float(words[1]), words[2] if len(words) > 2 else ""
                chosen = [sid for sid in upstream.sessions() if sid.startswith(prefix)]
                start_events(upstream, chosen, rate)
                print(f"events {len(chosen)}", flush=True)
                continue
            prefix = words[1] if len(words) > 1 else ""
            concurrent = opened = 0
            for sid in upstream.sessions():
                if sid.startswith(prefix):
                    stats = upstream.stats(sid)
                    concurrent += stats.concurrent
                    opened += stats.connections_total
            print(f"{upstream.total_concurrent()} {concurrent} {opened}", flush=True)
    finally:
        upstream.stop()
    return 0


def start_events(upstream: SSEUpstream, sids: Sequence[str], rate: float) -> None:
    """``rate`` numbered events/s on the streams of ``sids`` (0: none). A stream's first event
    goes out as it is switched on, so the switches are spread over one period: a steady flow
    of events, not all sessions' at once every period."""
    if rate <= 0:
        for sid in sids:
            upstream.configure(sid, total=0)
        return
    started, period = time.monotonic(), 1.0 / rate
    for i, sid in enumerate(sids):
        due = started + period * i / len(sids)
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)  # pacing a schedule, not waiting for a condition
        upstream.configure(sid, rate=rate, total=None)


class UpstreamProcess:
    """The test upstream in its own process: idle streams, or ``rate`` events/s each."""

    def __init__(
        self,
        children: Children,
        heartbeat: float = HEARTBEAT,
        rate: float = 0.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.proc, self.port = children.spawn_server(
            [
                sys.executable, __file__, "_upstream", "--heartbeat", str(heartbeat),
                "--rate", str(rate), "--host", host,
            ],
            "upstream",
        )  # fmt: skip

    def url(self, sid: str) -> str:
        return f"http://{self.host}:{self.port}/events/{sid}"

    def count(self, prefix: str) -> tuple[int, int, int]:
        """(open connections, open ones of ``prefix*`` sessions, ever opened by them)."""
        send_line(self.proc, f"count {prefix}")
        total, concurrent, opened = read_line(self.proc, 30, "upstream count").split()
        return int(total), int(concurrent), int(opened)

    def ask_events(self, prefix: str, rate: float) -> None:
        """``rate`` numbered events/s on the streams of ``prefix*`` sessions from now on (0:
        none, idle again), switched on over one period (:func:`start_events`)."""
        send_line(self.proc, f"events {rate} {prefix}")

    def events_set(self, rate: float) -> int:
        """The answer to :meth:`ask_events`: how many sessions it reached."""
        period = 1.0 / rate if rate > 0 else 0.0
        words = read_line(self.proc, 60 + period, "upstream events").split()
        if words[:1] != ["events"]:
            raise BenchError(f"upstream: unexpected answer {words!r}")
        return int(words[1])

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the upstream holds no connection (the previous phase's are gone)."""
        deadline = time.monotonic() + timeout
        while self.count("")[0] > 0:
            if time.monotonic() > deadline:
                raise BenchError(f"upstream still holds {self.count('')[0]} connections")
            time.sleep(0.2)


class UpstreamSpread:
    """Test upstreams on several loopback addresses (127.0.0.1, 127.0.0.2, ...), each in its
    own process, for more connections than one process may open files for or than one
    destination has ephemeral ports (about 28,000 for 32768-60999): each address is a
    destination of its own. A session's upstream follows from its name (:func:`spread_index`),
    so the bare-socket child finds the same one."""

    def __init__(
        self,
        children: Children,
        connections: int,
        heartbeat: float = HEARTBEAT,
        rate: float = 0.0,
        per_upstream: int = 0,
    ) -> None:
        count = max(1, math.ceil(connections / (per_upstream or CONNECTIONS_PER_UPSTREAM)))
        self.upstreams = [
            UpstreamProcess(children, heartbeat, rate, host=f"127.0.0.{n + 1}")
            for n in range(count)
        ]

    def url(self, sid: str) -> str:
        return self.upstreams[spread_index(sid, len(self.upstreams))].url(sid)

    def targets(self) -> str:
        """``host:port,host:port...``, in order: the bare-socket child's ``--targets``."""
        return ",".join(f"{u.host}:{u.port}" for u in self.upstreams)

    def count(self, prefix: str) -> tuple[int, int, int]:
        """:meth:`UpstreamProcess.count` summed over the upstreams."""
        counts = [u.count(prefix) for u in self.upstreams]
        return (
            sum(c[0] for c in counts),
            sum(c[1] for c in counts),
            sum(c[2] for c in counts),
        )

    def set_events(self, prefix: str, rate: float) -> int:
        """:meth:`UpstreamProcess.ask_events` on every upstream at once; how many sessions the
        switch reached."""
        for upstream in self.upstreams:
            upstream.ask_events(prefix, rate)
        return sum(upstream.events_set(rate) for upstream in self.upstreams)

    def wait_idle(self, timeout: float = 30.0) -> None:
        for upstream in self.upstreams:
            upstream.wait_idle(timeout)


# Below a process's usual open-file limit (20,000 here) and a destination's ephemeral ports.
CONNECTIONS_PER_UPSTREAM = 10_000


def spread_index(sid: str, count: int) -> int:
    """Which of ``count`` spread upstreams serves ``sid`` (stable across processes)."""
    return zlib.crc32(sid.encode()) % count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="child", required=True)
    hose = sub.add_parser("_firehose")
    hose.add_argument("--rate", type=float, default=0.0)
    hose.add_argument("--chunk", type=int, default=16)
    hose.add_argument("--payload-bytes", type=int, default=PAYLOAD_BYTES)
    up = sub.add_parser("_upstream")
    up.add_argument("--heartbeat", type=float, default=HEARTBEAT)
    up.add_argument("--rate", type=float, default=0.0, help="events/s per stream (0: idle)")
    up.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    opts = parser.parse_args(argv)
    if opts.child == "_firehose":
        return firehose_child(opts.rate, opts.chunk, opts.payload_bytes)
    return upstream_child(opts.heartbeat, opts.rate, opts.host)


if __name__ == "__main__":
    sys.exit(main())
