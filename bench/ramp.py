"""Ramp: from the first ``PUT`` of N sessions to all N listening.

A private ``redis-server``, the idle test upstream (``rig_upstreams.py _upstream``: heartbeats
only), one ``python -m gateway`` and ``--workers`` ``python -m workers`` processes (2: one per core
of the reference machine). The bench sends N PUTs to the gateway (``--concurrency`` in flight, over
keep-alive connections; with ``--batch K``, ``PUT /v1/sessions`` requests of K sessions each)
and polls every ``lp:{sid}:state`` until all read ``listening``. The time is Redis's own: from
Redis's ``TIME`` at the first PUT to the latest ``since`` Redis wrote with a ``listening``
state, so the poll (every 0.25 s, of the sessions not yet listening) is cheap and adds nothing
to the figure. No baseline: the target is absolute (10,000 in <= 10 s, or <= 5 s with
``--batch``). Figures last::

    ramp_seconds_10000: 8.1 s (target <= 10 s) PASS

    .venv/bin/python bench/ramp.py                    # 10,000 sessions, 2 workers
    .venv/bin/python bench/ramp.py --sessions 2000 --workers 1
    .venv/bin/python bench/ramp.py --batch 500 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

# bench/ is sys.path[0] when this file runs as a script.
import rig
from rig_upstreams import UpstreamProcess

SESSIONS = 10_000
WORKERS = 2
TARGET_S = 10.0  # 10,000 sessions with one PUT each
TARGET_BATCH_S = 5.0  # with PUT /v1/sessions carrying many
LEASE_TTL = 10.0
POLL_S = 0.25  # s between polls of the states; the times measured are Redis's, not the poll's


# The bench measures bring-up, not the API's throttling.
GATEWAY_ENV = {"LP_LEASE_TTL": str(LEASE_TTL), "LP_API_RATE": "0"}


async def put_lane(
    port: int, work: list[tuple[str, str]], statuses: Counter[int], batch: int
) -> None:
    """PUT sessions over one keep-alive connection until ``work`` is empty: one
    ``PUT /v1/sessions/{sid}`` each, or ``PUT /v1/sessions`` with ``batch`` at a time (each
    session of a 200 answer counts as a 200). A plain HTTP/1.1 client: httpx's per-request
    overhead would make the bench itself the bottleneck."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while work:
            if batch:
                items = [work.pop() for _ in range(min(batch, len(work)))]
                path = "/v1/sessions"
                payload: object = {"sessions": [{"sid": sid, "url": url} for sid, url in items]}
            else:
                sid, url = work.pop()
                path, payload = f"/v1/sessions/{sid}", {"url": url}
            body = json.dumps(payload).encode()
            writer.write(
                f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            answer = await reader.readexactly(length)
            status = int(head.split(b" ", 2)[1])
            if batch and status == 200:
                statuses[200] += len(json.loads(answer)["results"])
            else:
                statuses[status] += 1
    finally:
        writer.close()


async def listening_since(
    client: Any, state_keys: dict[str, str], waiting: set[str], since: dict[str, int]
) -> Counter[str]:
    """Move the ``waiting`` sessions that listen now into ``since`` (the Redis time, in ms,
    their state became ``listening``); the states of those still waiting, counted."""
    order = sorted(waiting)
    states: Counter[str] = Counter()
    for start in range(0, len(order), rig.STATE_CHUNK):
        chunk = order[start : start + rig.STATE_CHUNK]
        async with client.pipeline(transaction=False) as pipe:
            for sid in chunk:
                pipe.hmget(state_keys[sid], "state", "since")
            replies = await pipe.execute()
        for sid, (state, at) in zip(chunk, replies, strict=True):
            if state == b"listening":
                since[sid] = int(at)
                waiting.discard(sid)
            else:
                states[state.decode() if state else "none"] += 1
    return states


async def ramp(
    port: int, upstream: UpstreamProcess, redis_url: str, opts: argparse.Namespace
) -> dict[str, float]:
    import redis.asyncio as aioredis

    sids = [f"ramp-{i}" for i in range(opts.sessions)]
    state_keys = dict(zip(sids, rig.state_keys_of(sids), strict=True))
    statuses: Counter[int] = Counter()
    client = aioredis.Redis.from_url(redis_url)
    work = [(sid, upstream.url(sid)) for sid in reversed(sids)]
    waiting = set(sids)
    since: dict[str, int] = {}  # Redis ms when each session's state became listening
    try:
        started_ms = rig.redis_ms(await client.time())
        started = time.monotonic()
        lanes = asyncio.gather(
            *(put_lane(port, work, statuses, opts.batch) for _ in range(opts.concurrency))
        )
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
                # Polled only once every PUT is answered (none can be done before), and only
                # the sessions not yet listening: the times are Redis's own (each state's
                # 'since'), so the poll can be slow and leave the CPU to the pool.
                states = await listening_since(client, state_keys, waiting, since)
                if not waiting:
                    break
            if now > deadline:  # a missed target, reported as such below
                break
            if now - last_print >= 5:
                last_print = now
                seen = (
                    {"listening": len(since), **states}
                    if puts_done is not None
                    else f"{sum(statuses.values())} PUTs"
                )
                print(f"  {now - started:.0f}s: {seen}", flush=True)
            await asyncio.sleep(POLL_S)
        if puts_done is None:  # the deadline passed during the PUTs
            await listening_since(client, state_keys, waiting, since)
        listening = len(since)
        elapsed = (
            (max(since.values()) - started_ms) / 1000 if not waiting else time.monotonic() - started
        )
        await lanes
        if puts_done is None:
            puts_done = time.monotonic() - started
        ok = statuses[201] + statuses[200]
        if ok != len(sids):
            raise rig.BenchError(f"PUT statuses: {dict(statuses)}")
        return {"seconds": elapsed, "puts": puts_done, "ok": ok, "listening": listening}
    finally:
        await client.aclose()


def run(opts: argparse.Namespace) -> int:
    with rig.Rig(opts.log_dir, "lp-ramp-") as bench:
        server = bench.redis()
        machine = f"{rig.machine_line()}, Redis {rig.redis_version(server.url)}"
        print(
            f"ramp bench: {opts.sessions} sessions, {opts.workers} workers; {machine}", flush=True
        )
        children, log_dir = bench.children, bench.log_dir
        upstream = UpstreamProcess(children)
        gateway, port = rig.start_gateway(
            children, server.url, log_dir / "gateway.log", GATEWAY_ENV
        )
        capacity = -(-opts.sessions // opts.workers) + 64
        workers = [
            rig.start_worker(
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
        cpu0 = {name: rig.cpu_seconds(pid) for name, pid in pids.items()}
        result = asyncio.run(ramp(port, upstream, server.url, opts))
        used = {name: rig.cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        cpu = {name: 100 * seconds / result["seconds"] for name, seconds in used.items()}
        print()
        how = f"PUT /v1/sessions x {opts.batch}" if opts.batch else "PUT /v1/sessions/{sid}"
        print(f"ramp: {opts.sessions:,} sessions ({how}) -> all listening -- {machine}")
        print(
            f"  sessions answered 200/201: {result['ok']:,.0f}, all sent in {result['puts']:.1f}s"
        )
        print(
            "  CPU % of a core over the ramp: " + ", ".join(f"{n} {v:.0f}" for n, v in cpu.items())
        )
        print()
        n = opts.sessions
        listening = int(result["listening"])
        rate = listening / result["seconds"]
        rig.figure(f"ramp_rate_{n}", f"{rate:,.0f} sessions/s")
        rig.figure(
            f"gateway_cpu_per_session_{n}",
            f"{used['gateway'] / n * 1e6:,.0f} us",
            f"info: the gateway's CPU from the first PUT to all listening, over {n:,} sessions",
        )
        if listening < n:
            rig.figure(
                f"ramp_seconds_{n}",
                f"> {opts.timeout:g} s, {listening}/{n} listening at the --timeout",
                f"target <= {opts.target:g} s",
                False,
            )
        else:
            rig.figure(
                f"ramp_seconds_{n}",
                f"{result['seconds']:.1f} s",
                f"target <= {opts.target:g} s",
                result["seconds"] <= opts.target,
            )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="(10000)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="worker processes (2)")
    parser.add_argument("--concurrency", type=int, default=64, help="PUTs in flight (64)")
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="sessions per PUT /v1/sessions (0: one PUT /v1/sessions/{sid} each; at most the "
        "gateway's LP_MAX_BATCH, 1000, and a body within LP_MAX_BODY_BYTES, 64 KiB: ~500)",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="give up after (180 s)")
    parser.add_argument(
        "--target", type=float, default=0.0, help="s (10 with single PUTs, 5 with --batch)"
    )
    parser.add_argument("--log-dir", default="", help="keep gateway/worker logs here")
    opts = parser.parse_args(argv)
    if opts.batch < 0 or opts.concurrency < 1 or opts.sessions < 1 or opts.target < 0:
        parser.error("--batch and --target must be >= 0, --concurrency and --sessions >= 1")
    opts.target = opts.target or (TARGET_BATCH_S if opts.batch else TARGET_S)
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    return rig.run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
