"""Ramp: from the first ``PUT /v1/sessions/{sid}`` of N sessions to all N listening.

A private ``redis-server``, the idle test upstream (``density.py _upstream``: heartbeats only),
one ``python -m gateway`` and ``--workers`` ``python -m workers`` processes (2: one per core of
the reference machine). The bench sends N PUTs to the gateway (``--concurrency`` in flight, over
keep-alive connections) and polls every ``lp:{sid}:state`` until all read ``listening``. No
baseline: the target is absolute (<= 10 s for 10,000). Figures last::

    ramp_seconds_10000: 8.1 s (target <= 10 s) PASS

    .venv/bin/python bench/ramp.py                    # 10,000 sessions, 2 workers
    .venv/bin/python bench/ramp.py --sessions 2000 --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from density import (
    BenchError,
    Children,
    UpstreamProcess,
    count_states,
    machine_line,
    run_guarded,
    verdict,
)
from rig import cpu_seconds, redis_version, start_worker

SESSIONS = 10_000
WORKERS = 2
TARGET_S = 10.0
LEASE_TTL = 10.0


def start_gateway(
    children: Children, redis_url: str, log_path: Path
) -> tuple[subprocess.Popen[bytes], int]:
    import httpx

    from listenerpool.testing.redis_server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LP_")}
    env.update(
        LP_REDIS_URL=redis_url, LP_HOST="127.0.0.1", LP_PORT=str(port), LP_LOG_LEVEL="WARNING",
        LP_LEASE_TTL=str(LEASE_TTL), LP_API_RATE="0",  # the bench measures bring-up, not throttling
    )  # fmt: skip
    with open(log_path, "wb") as log:
        proc = children.spawn([sys.executable, "-m", "gateway"], env=env, log=log)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"gateway did not start: see {log_path}")
        time.sleep(0.05)


async def put_lane(port: int, work: list[tuple[str, str]], statuses: Counter[int]) -> None:
    """PUT sessions over one keep-alive connection until ``work`` is empty. A plain HTTP/1.1
    client: httpx's per-request overhead would make the bench itself the bottleneck."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while work:
            sid, url = work.pop()
            body = json.dumps({"url": url}).encode()
            writer.write(
                f"PUT /v1/sessions/{sid} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            statuses[int(head.split(b" ", 2)[1])] += 1
    finally:
        writer.close()


async def ramp(
    port: int, upstream: UpstreamProcess, redis_url: str, opts: argparse.Namespace
) -> dict[str, float]:
    import redis.asyncio as aioredis

    from listenerpool import keys

    sids = [f"ramp-{i}" for i in range(opts.sessions)]
    state_keys = [keys.SessionKeys(sid).state for sid in sids]
    statuses: Counter[int] = Counter()
    client = aioredis.Redis.from_url(redis_url)
    work = [(sid, upstream.url(sid)) for sid in reversed(sids)]
    try:
        started = time.monotonic()
        lanes = asyncio.gather(*(put_lane(port, work, statuses) for _ in range(opts.concurrency)))
        puts_done = None
        deadline = started + opts.timeout
        last_print = started
        states: Counter[str] = Counter()
        while True:
            if puts_done is None and lanes.done():
                lanes.result()
                puts_done = time.monotonic() - started
            now = time.monotonic()
            if puts_done is not None:
                # Polled only once every PUT is answered (none can be done before): reading
                # 10,000 states every 100 ms would take CPU from the PUT lanes in this process.
                states = await count_states(client, state_keys)
                if states["listening"] == len(sids):
                    break
            if now > deadline:  # a missed target, reported as such below
                break
            if now - last_print >= 5:
                last_print = now
                seen = dict(states) if puts_done is not None else f"{sum(statuses.values())} PUTs"
                print(f"  {now - started:.0f}s: {seen}", flush=True)
            await asyncio.sleep(0.1)
        if puts_done is None:  # the deadline passed during the PUTs
            states = await count_states(client, state_keys)
        elapsed = time.monotonic() - started
        listening = states["listening"]
        await lanes
        if puts_done is None:
            puts_done = time.monotonic() - started
        ok = statuses[201] + statuses[200]
        if ok != len(sids):
            raise BenchError(f"PUT statuses: {dict(statuses)}")
        return {"seconds": elapsed, "puts": puts_done, "ok": ok, "listening": listening}
    finally:
        await client.aclose()


def run(opts: argparse.Namespace) -> int:
    from listenerpool.testing.redis_server import RedisServer

    children = Children()
    server = RedisServer()
    try:
        server.start()
        machine = f"{machine_line()}, Redis {redis_version(server.url)}"
        print(
            f"ramp bench: {opts.sessions} sessions, {opts.workers} workers; {machine}", flush=True
        )
        with contextlib.ExitStack() as stack:
            if opts.log_dir:
                log_dir = Path(opts.log_dir)
                log_dir.mkdir(parents=True, exist_ok=True)
            else:
                log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lp-ramp-")))
            upstream = UpstreamProcess(children, 15.0)
            gateway, port = start_gateway(children, server.url, log_dir / "gateway.log")
            capacity = -(-opts.sessions // opts.workers) + 64
            workers = [
                start_worker(
                    children,
                    server.url,
                    worker_id=f"bench-ramp-{i}",
                    capacity=capacity,
                    lease_ttl=LEASE_TTL,
                    log_path=log_dir / f"worker-{i}.log",
                )
                for i in range(opts.workers)
            ]
            assert server.process is not None
            pids = {
                "gateway": gateway.pid,
                "redis": server.process.pid,
                "upstream": upstream.proc.pid,
            }
            pids.update({f"worker{i}": w.pid for i, w in enumerate(workers)})
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            result = asyncio.run(ramp(port, upstream, server.url, opts))
            cpu = {n: 100 * (cpu_seconds(p) - cpu0[n]) / result["seconds"] for n, p in pids.items()}
        print()
        print(f"ramp: {opts.sessions:,} PUTs -> all listening -- {machine}")
        print(f"  PUTs answered 200/201: {result['ok']:,.0f}, all sent in {result['puts']:.1f}s")
        print(
            "  CPU % of a core over the ramp: " + ", ".join(f"{n} {v:.0f}" for n, v in cpu.items())
        )
        print()
        n = opts.sessions
        listening = int(result["listening"])
        rate = listening / result["seconds"]
        print(f"ramp_rate_{n}: {rate:,.0f} sessions/s (info)")
        if listening < n:
            print(
                f"ramp_seconds_{n}: > {opts.timeout:g} s, {listening}/{n} listening at the "
                f"--timeout (target <= {opts.target:g} s) FAIL"
            )
        else:
            print(
                f"ramp_seconds_{n}: {result['seconds']:.1f} s (target <= {opts.target:g} s) "
                f"{verdict(result['seconds'] <= opts.target)}"
            )
    finally:
        children.close()
        server.stop()
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="(10000)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="worker processes (2)")
    parser.add_argument("--concurrency", type=int, default=64, help="PUTs in flight (64)")
    parser.add_argument("--timeout", type=float, default=180.0, help="give up after (180 s)")
    parser.add_argument("--target", type=float, default=TARGET_S, help="(10 s)")
    parser.add_argument("--log-dir", default="", help="keep gateway/worker logs here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
