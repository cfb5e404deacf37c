"""Shared parts of the newer benches: a firehose/paced SSE upstream, starting a worker, claiming
sessions and waiting until they listen, and the figure-line format.

The firehose upstream (``rig.py _firehose``) serves ``GET /events/{sid}``: every connection gets
``--chunk`` events per write (``id: n``, ``event: TEXT_MESSAGE_CONTENT``, ~``--payload-bytes``
of data), as fast as the socket drains (``--rate 0``), or ``--rate`` events/s per connection
(evenly spread over connections). It prints ``port N`` and answers ``count`` on stdin with the
number of events written and the connections ever opened (``EMITTED OPENED OPEN``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from density import BenchError, Children, count_states, read_line, send_line, worker_env

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD_BYTES = 160
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Connection: close\r\n\r\n"
)


# ============================================================================================
# The upstream child
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
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
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
        self, children: Children, *, rate: float = 0.0, chunk: int = 16, payload: int = 160
    ) -> None:
        self.proc = children.spawn(
            [
                sys.executable, __file__, "_firehose", "--rate", str(rate), "--chunk", str(chunk),
                "--payload-bytes", str(payload),
            ]
        )  # fmt: skip
        words = read_line(self.proc, 30, "upstream start").split()
        if len(words) != 2 or words[0] != "port":
            raise BenchError(f"upstream start: unexpected {words!r}")
        self.port = int(words[1])

    def url(self, sid: str) -> str:
        return f"http://127.0.0.1:{self.port}/events/{sid}"

    def count(self) -> tuple[int, int, int]:
        """(events emitted, connections ever opened, connections open)."""
        send_line(self.proc, "count")
        emitted, opened, open_ = read_line(self.proc, 30, "upstream count").split()
        return int(emitted), int(opened), int(open_)


# ============================================================================================
# Worker and sessions
# ============================================================================================
def start_worker(
    children: Children,
    redis_url: str,
    *,
    worker_id: str,
    capacity: int,
    lease_ttl: float,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m workers``, returned once it registered in ``lp:workers``."""
    from listenerpool import keys

    env = worker_env(redis_url, capacity, lease_ttl)
    env["LP_WORKER_ID"] = worker_id
    env.update(extra_env or {})
    with open(log_path, "wb") as log:
        proc = children.spawn([sys.executable, "-m", "workers"], env=env, log=log)
    sync = plain_client(redis_url)
    try:
        deadline = time.monotonic() + 30
        while not sync.exists(keys.worker_key(worker_id)):
            if proc.poll() is not None:
                raise BenchError(f"worker exited with {proc.returncode}: see {log_path}")
            if time.monotonic() > deadline:
                raise BenchError(f"worker did not register within 30s: see {log_path}")
            time.sleep(0.05)
    finally:
        sync.close()
    return proc


def plain_client(redis_url: str) -> Any:
    """A blocking redis-py client for a pool URL: ``redis.Redis`` for ``redis://``, a
    ``redis.RedisCluster`` for ``redis+cluster://`` (any key, any slot)."""
    import redis
    from redis.cluster import ClusterNode

    from listenerpool.redis_url import RedisKind, parse_redis_url

    target = parse_redis_url(redis_url)
    if target.kind is RedisKind.CLUSTER:
        return redis.RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
            username=target.username,
            password=target.password,
        )
    return redis.Redis.from_url(redis_url)


async def claim_and_wait(
    redis_url: str,
    sids: Sequence[str],
    url_of: Callable[[str], str],
    *,
    lease_ttl: float,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    batch: int = 64,
) -> float:
    """Claim every session through :class:`SessionControl`; return the seconds until all of
    them read ``listening``. Raises BenchError after ``timeout``."""
    from listenerpool import keys
    from listenerpool.connections import async_redis, listen_queue, sync_redis
    from listenerpool.control import SessionControl
    from listenerpool.settings import load_settings

    settings = load_settings(redis_url=redis_url, lease_ttl=lease_ttl)
    aredis = async_redis(settings)
    sync = sync_redis(settings)
    state_keys = [keys.SessionKeys(sid).state for sid in sids]
    try:
        control = SessionControl(aredis, listen_queue(sync, settings), settings)
        started = time.monotonic()
        for start in range(0, len(sids), batch):
            chunk = sids[start : start + batch]
            await asyncio.gather(*(control.claim(sid, url_of(sid)) for sid in chunk))
        deadline = started + timeout
        while (states := await count_states(aredis, state_keys))["listening"] < len(sids):
            if not alive():
                raise BenchError("a worker exited during bring-up")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"only {states['listening']}/{len(sids)} listening after {timeout:g}s: "
                    f"{dict(states)}"
                )
            await asyncio.sleep(0.05)
        return time.monotonic() - started
    finally:
        await aredis.aclose()
        sync.close()


# ============================================================================================
# Figures
# ============================================================================================
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); inf for no values."""
    if not values:
        return math.inf
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def redis_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


def parse_child(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="child", required=True)
    hose = sub.add_parser("_firehose")
    hose.add_argument("--rate", type=float, default=0.0)
    hose.add_argument("--chunk", type=int, default=16)
    hose.add_argument("--payload-bytes", type=int, default=PAYLOAD_BYTES)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_child(sys.argv[1:] if argv is None else argv)
    return firehose_child(opts.rate, opts.chunk, opts.payload_bytes)


if __name__ == "__main__":
    sys.exit(main())
