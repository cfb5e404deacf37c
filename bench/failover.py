"""Failover: a worker is SIGKILLed; how long until each of its sessions listens on another.

For each lease TTL in ``--ttls`` (3 s and 10 s): a private ``redis-server``, the idle test upstream
(``density.py _upstream``), worker A holding ``--sessions`` (200) sessions, then worker B (both
``python -m workers`` with ``LP_LEASE_TTL`` = TTL). The bench SIGKILLs A (no FIN reaches
Redis: its leases simply stop being renewed) and polls every session's ``lp:{sid}:state`` every
``--poll`` s (pipelined) until it reads ``listening`` with owner B. Per session: kill -> that
moment. No baseline: the target is the TTL plus 1 s. Figures last::

    failover_p99_ttl3: 3.9 s (target <= 4 s = ttl + 1 s) PASS

    .venv/bin/python bench/failover.py
    .venv/bin/python bench/failover.py --ttls 10 --sessions 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from density import BenchError, Children, UpstreamProcess, machine_line, run_guarded, verdict
from rig import claim_and_wait, percentile, start_worker

SESSIONS = 200


def redis_version() -> str:
    import subprocess

    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    word = next((w for w in out.split() if w.startswith("v=")), "v=?")
    return f"Redis {word[2:]}"


@dataclass
class Result:
    ttl: float
    sessions: int
    latencies: list[float] = field(default_factory=list)  # s, kill -> listening on B
    missing: int = 0

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99) if not self.missing else float("inf")


async def watch(
    redis_url: str, sids: Sequence[str], owner: str, started: float, opts: argparse.Namespace
) -> tuple[list[float], int]:
    import redis.asyncio as aioredis

    from listenerpool import keys

    client = aioredis.Redis.from_url(redis_url)
    pending = {keys.SessionKeys(sid).state: sid for sid in sids}
    done: list[float] = []
    try:
        deadline = started + opts.timeout
        while pending and time.monotonic() < deadline:
            names = list(pending)
            async with client.pipeline(transaction=False) as pipe:
                for key in names:
                    pipe.hmget(key, "state", "owner")
                replies = await pipe.execute()
            now = time.monotonic()
            for key, (state, who) in zip(names, replies, strict=True):
                if state == b"listening" and who == owner.encode():
                    done.append(now - started)
                    del pending[key]
            await asyncio.sleep(opts.poll)
        return done, len(pending)
    finally:
        await client.aclose()


def run_ttl(ttl: float, children: Children, opts: argparse.Namespace, log_dir: Path) -> Result:
    from listenerpool.testing.redis_server import RedisServer

    result = Result(ttl, opts.sessions)
    server = RedisServer()
    procs = []
    try:
        server.start()
        upstream = UpstreamProcess(children, 15.0)
        procs.append(upstream.proc)
        worker_a = start_worker(
            children, server.url, worker_id="bench-fo-a", capacity=opts.sessions + 64,
            lease_ttl=ttl, log_path=log_dir / f"worker-a-ttl{ttl:g}.log",
        )  # fmt: skip
        procs.append(worker_a)
        sids = [f"fo-{i}" for i in range(opts.sessions)]
        asyncio.run(
            claim_and_wait(
                server.url, sids, upstream.url, lease_ttl=ttl, timeout=120,
                alive=lambda: worker_a.poll() is None,
            )
        )  # fmt: skip
        worker_b = start_worker(
            children, server.url, worker_id="bench-fo-b", capacity=opts.sessions + 64,
            lease_ttl=ttl, log_path=log_dir / f"worker-b-ttl{ttl:g}.log",
        )  # fmt: skip
        procs.append(worker_b)
        time.sleep(opts.settle)
        started = time.monotonic()
        worker_a.send_signal(signal.SIGKILL)
        result.latencies, result.missing = asyncio.run(
            watch(server.url, sids, "bench-fo-b", started, opts)
        )
        if worker_b.poll() is not None:
            raise BenchError(f"worker B exited with {worker_b.returncode}")
    finally:
        for proc in reversed(procs):
            Children.stop(proc, timeout=10)
        server.stop()
    return result


def print_report(results: Sequence[Result], opts: argparse.Namespace, machine: str) -> None:
    print()
    print(f"failover: SIGKILL of the worker holding {opts.sessions} sessions -- {machine}")
    for r in results:
        lat = r.latencies
        print(
            f"  ttl {r.ttl:g}s: {len(lat)}/{r.sessions} resumed on the other worker; kill -> "
            f"listening p50 {percentile(lat, 50):.2f}s, p90 {percentile(lat, 90):.2f}s, "
            f"p99 {percentile(lat, 99):.2f}s, max {percentile(lat, 100):.2f}s"
        )
    print()
    for r in results:
        target = r.ttl + 1.0
        print(
            f"failover_p99_ttl{r.ttl:g}: {r.p99:.2f} s (target <= {target:g} s = lease ttl + 1 s; "
            f"{r.missing} not resumed) {verdict(r.p99 <= target)}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ttls", default="3,10", help="lease TTLs in s (3,10)")
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="(200)")
    parser.add_argument("--poll", type=float, default=0.02, help="state poll period s (0.02)")
    parser.add_argument("--settle", type=float, default=1.0, help="s between B up and kill (1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up after (60 s)")
    parser.add_argument("--log-dir", default="", help="keep worker logs here")
    opts = parser.parse_args(argv)
    try:
        opts.ttl_list = [float(t) for t in opts.ttls.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--ttls: not a list of numbers: {opts.ttls!r}")
    return opts


def run(opts: argparse.Namespace) -> int:
    children = Children()
    results: list[Result] = []
    try:
        machine = f"{machine_line()}, {redis_version()}"
        with contextlib.ExitStack() as stack:
            if opts.log_dir:
                log_dir = Path(opts.log_dir)
                log_dir.mkdir(parents=True, exist_ok=True)
            else:
                log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lp-fo-")))
            for ttl in opts.ttl_list:
                print(f"ttl {ttl:g}s: {opts.sessions} sessions", flush=True)
                results.append(run_ttl(ttl, children, opts, log_dir))
        print_report(results, opts, machine)
    finally:
        children.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
