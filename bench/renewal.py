"""Renewal flushes: the worker's CPU per lease renewal, and how long a flush holds its loop, on
the worker's lease channel against redis-py's pipelines (the baseline, in the same run).

A private ``redis-server`` holding ``--sessions`` (1,000) leases, and this process calling
``workers.renewal.renew_all`` on them as a worker's renewal round does: ``renew.lua`` in flushes
of ``renewal.BATCH`` (50), each followed by its sessions' lease index writes. Rounds alternate
between the two paths (``--rounds`` of each, 40), so that both see the same machine. A flush's
CPU time is how long it holds the loop that a worker's readers share: an event arriving then
waits that long. Figures last::

    renewal_cpu: 20.3 us per renewal on the lease channel, 0.56 of the pipelines' 36.4 us (info)
    renewal_flush_hold_p50: 1.03 ms per flush of 50 on the lease channel, pipelines 1.87 ms (info)

    .venv/bin/python bench/renewal.py
    .venv/bin/python bench/renewal.py --sessions 5000 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import Any

# bench/ is sys.path[0] when this file runs as a script.
import rig

SESSIONS = 1000
ROUNDS = 40
TTL_MS = 10_000
LEASE = "bench-renewal:token"


async def held_sessions(redis: Any, count: int) -> list[Any]:
    """``count`` sessions whose leases this process holds, at epoch 1 of their specs."""
    from listenerpool.keys import SessionKeys
    from listenerpool.lease import LeaseClock
    from listenerpool.spec import UpstreamSpec
    from workers.session import HeldSession

    sessions = []
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            k = SessionKeys(f"bench-renewal-{n}")
            pipe.set(k.lease, LEASE, px=TTL_MS)
            pipe.hset(k.spec, mapping={"epoch": 1, "url": "http://127.0.0.1/", "rev": 0})
            sessions.append(
                HeldSession(
                    k, "token", 1, LEASE, UpstreamSpec("http://127.0.0.1/"),
                    LeaseClock(confirmed_at=time.monotonic(), fence_after=TTL_MS / 1000),
                )
            )  # fmt: skip
        await pipe.execute()
    return sessions


async def measure(redis_url: str, opts: argparse.Namespace) -> dict[str, list[float]]:
    """Per path, the CPU seconds of each flush (renewals and their index writes)."""
    from listenerpool.connections import async_redis
    from listenerpool.scripts import Scripts
    from listenerpool.settings import load_settings
    from workers import renewal
    from workers.script_channel import ScriptChannel

    redis = async_redis(load_settings(redis_url=redis_url))
    channel = ScriptChannel.of(redis, reply_timeout=10.0)
    if channel is None:
        raise rig.BenchError("no script channel for this server")
    flushes: dict[str, list[float]] = {"channel": [], "pipelines": []}
    try:
        scripts = Scripts.register(redis)
        await scripts.preload(redis)
        sessions = await held_sessions(redis, opts.sessions)
        for _ in range(opts.rounds):
            for path, send in (("channel", channel.send), ("pipelines", None)):
                for start in range(0, len(sessions), renewal.BATCH):
                    batch = sessions[start : start + renewal.BATCH]
                    began = time.process_time()
                    verdicts = await renewal.renew_all(redis, scripts, batch, TTL_MS, send=send)
                    flushes[path].append(time.process_time() - began)
                    if any(v is not renewal.RenewVerdict.RENEWED for v in verdicts):
                        raise rig.BenchError(f"a lease was not renewed: {verdicts}")
    finally:
        channel.close()
        await redis.aclose()
    return flushes


def run(opts: argparse.Namespace) -> int:
    from workers import renewal

    with rig.Rig("", "lp-renewal-") as bench:
        server = bench.redis()
        machine = f"{rig.machine_line()}, Redis {rig.redis_version(server.url)}"
        flushes = asyncio.run(measure(server.url, opts))
    renewals = opts.rounds * opts.sessions
    per = {path: sum(times) / renewals * 1e6 for path, times in flushes.items()}
    hold = {path: rig.percentile(times, 50) * 1e3 for path, times in flushes.items()}
    hold99 = {path: rig.percentile(times, 99) * 1e3 for path, times in flushes.items()}
    print()
    print(f"renewal: {opts.sessions:,} leases x {opts.rounds} rounds per path -- {machine}")
    for path in flushes:
        print(
            f"  {path:9s} {per[path]:6.1f} us CPU per renewal; a flush of {renewal.BATCH} holds "
            f"the loop p50 {hold[path]:.2f} ms, p99 {hold99[path]:.2f} ms"
        )
    print()
    rig.figure(
        "renewal_cpu",
        f"{per['channel']:.1f} us per renewal on the lease channel, "
        f"{per['channel'] / per['pipelines']:.2f} of the pipelines' {per['pipelines']:.1f} us",
    )
    rig.figure(
        "renewal_flush_hold_p50",
        f"{hold['channel']:.2f} ms per flush of {renewal.BATCH} on the lease channel, "
        f"pipelines {hold['pipelines']:.2f} ms",
    )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="leases held (1000)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds per path (40)")
    opts = parser.parse_args(argv)
    if opts.sessions < 1 or opts.rounds < 1:
        parser.error("--sessions and --rounds must be at least 1")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    return rig.run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
