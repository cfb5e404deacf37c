"""Cancel latency: from ``SessionControl.cancel(sid)`` to the worker letting go of the session.

Two variants, each against a fresh ``python -m workers`` child holding ``--count`` sessions:

1. **listening** -- every session streams from the test upstream (``--rate`` events/s, so the
   streams are live but cheap). The latency of one cancel runs from just before the
   ``cancel()`` call (``t0``) to the first client-side disconnect the upstream records for that
   session at or after ``t0`` (``SSEUpstream.stats(sid).disconnects``, ``time.monotonic()``
   values taken by the upstream's own thread when it sees the FIN).
2. **backoff** -- every session's upstream answers HTTP 500, and the worker runs with
   ``LP_BACKOFF_BASE=30 LP_BACKOFF_CAP=30``, so each reader sleeps in a backoff of up to 30 s
   and has no socket to close. The latency runs from ``t0`` to the first poll (every
   ``--poll`` s, pipelined) that reads ``lp:{sid}:state`` = ``stopped`` and no ``lp:{sid}:lease``
   (the worker released it).

Cancels are issued ``--concurrency`` at a time (default 1: one after the other, each waiting
for its session to be let go). Its own ``redis-server`` runs on a free port; the upstream
(:class:`SSEUpstream`) runs in a thread of the bench so its stats are read directly. The figure
is an absolute latency against a fixed target, so no baseline is measured. Figures come last::

    cancel_p99_listening: 3.2 ms (target <= 50 ms over 1000 cancels) PASS

Exit status 0 even when a target is missed; non-zero when the run itself breaks. Every child is
stopped on exit, Ctrl-C included.

    .venv/bin/python bench/cancel.py                       # --variant both --count 1000/200
    .venv/bin/python bench/cancel.py --variant listening --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# bench/ is sys.path[0] when this file runs as a script.
import rig
from rig_upstreams import HEARTBEAT

if TYPE_CHECKING:
    import psutil

    from listenerpool.control import SessionControl
    from listenerpool.testing.upstream import SSEUpstream

WORKER_ID = "bench-cancel"
LEASE_TTL = 10.0
RATE = 1.0  # events/s per listening stream
BACKOFF = 30.0  # LP_BACKOFF_BASE and LP_BACKOFF_CAP of the backoff variant
COUNT_LISTENING = 1000
COUNT_BACKOFF = 200
TARGET_MS = 50.0
TIMEOUT = 15.0  # a cancel not seen done by then counts as missed (infinite latency)
VARIANTS = ("listening", "backoff")


# ============================================================================================
# Measurement
# ============================================================================================
@dataclass
class VariantResult:
    variant: str
    count: int
    concurrency: int
    latencies: list[float] = field(default_factory=list)  # s; math.inf = not seen in time
    calls: list[float] = field(default_factory=list)  # s the cancel() call itself took
    records: list[tuple[str, float, float, float]] = field(
        default_factory=list
    )  # sid, t0, t1, done
    unknown: int = 0  # cancel() returned False
    claims: Counter[str] = field(default_factory=Counter)
    bringup_seconds: float = 0.0
    states_before: Counter[str] = field(default_factory=Counter)
    states_after: Counter[str] = field(default_factory=Counter)
    cancel_seconds: float = 0.0
    worker_cpu_percent: float = 0.0
    upstream_open_after: int = 0
    worker_load_after: str = "?"
    worker: rig.WorkerEnd = field(default_factory=rig.WorkerEnd)

    @property
    def missed(self) -> int:
        return sum(1 for x in self.latencies if math.isinf(x))


class Watcher(ABC):
    """Resolves, every ``poll`` seconds, the cancels whose session has been let go.

    ``check`` gets ``{sid: t0}`` of the pending cancels and returns ``{sid: done_at}``.
    """

    def __init__(self, poll: float) -> None:
        self.poll = poll
        self.pending: dict[str, tuple[float, asyncio.Future[float]]] = {}

    def watch(self, sid: str, t0: float) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.pending[sid] = (t0, fut)
        return fut

    @abstractmethod
    async def check(self, started: dict[str, float]) -> dict[str, float]:
        """The sessions among ``started`` (sid -> t0) that are done, with their done time."""

    async def run(self) -> None:
        while True:
            for sid in [s for s, (_, fut) in self.pending.items() if fut.done()]:
                del self.pending[sid]  # timed out and cancelled by the waiter
            if self.pending:
                done = await self.check({sid: t0 for sid, (t0, _) in self.pending.items()})
                for sid, at in done.items():
                    _, fut = self.pending.pop(sid)
                    if not fut.done():
                        fut.set_result(at)
            await asyncio.sleep(self.poll)


class DisconnectWatcher(Watcher):
    """Done when the upstream recorded a client-side close at or after ``t0`` (its own
    timestamp: the poll period does not add to the figure)."""

    def __init__(self, poll: float, upstream: SSEUpstream) -> None:
        super().__init__(poll)
        self.upstream = upstream

    async def check(self, started: dict[str, float]) -> dict[str, float]:
        done = {}
        for sid, t0 in started.items():
            after = [d for d in self.upstream.stats(sid).disconnects if d >= t0]
            if after:
                done[sid] = min(after)
        return done


class StoppedWatcher(Watcher):
    """Done when the state hash reads ``stopped`` and the lease key is gone; the time is when
    the poll's reply arrived (an upper bound, at most one poll period plus one round trip late)."""

    def __init__(self, poll: float, redis: Any) -> None:
        super().__init__(poll)
        self.redis = redis

    async def check(self, started: dict[str, float]) -> dict[str, float]:
        from listenerpool import keys

        sids = list(started)
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                k = keys.SessionKeys(sid)
                pipe.hget(k.state, "state")
                pipe.exists(k.lease)
            replies = await pipe.execute()
        now = time.monotonic()
        return {
            sid: now
            for sid, state, lease in zip(sids, replies[::2], replies[1::2], strict=True)
            if state == b"stopped" and not lease
        }


async def cancel_all(
    control: SessionControl,
    sids: Sequence[str],
    watcher: Watcher,
    concurrency: int,
    result: VariantResult,
) -> None:
    """``concurrency`` lanes, each cancelling one session and waiting until it is let go."""
    todo = iter(sids)

    async def lane() -> None:
        for sid in todo:
            t0 = time.monotonic()
            found = await control.cancel(sid)
            t1 = time.monotonic()
            result.calls.append(t1 - t0)
            if not found:
                result.unknown += 1
            try:
                done_at = await asyncio.wait_for(watcher.watch(sid, t0), TIMEOUT)
            except TimeoutError:
                done_at = math.inf
            result.latencies.append(done_at - t0)
            result.records.append((sid, t0, t1, done_at))

    poller = asyncio.create_task(watcher.run())
    try:
        await asyncio.gather(*(lane() for _ in range(concurrency)))
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


# ============================================================================================
# One variant: worker child, claims, bring-up, cancels
# ============================================================================================
def run_variant(
    children: rig.Children,
    upstream: SSEUpstream,
    redis_url: str,
    variant: str,
    count: int,
    opts: argparse.Namespace,
    log_dir: Path,
) -> VariantResult:
    import psutil

    from listenerpool import keys

    result = VariantResult(variant, count, opts.concurrency)
    result.worker.log_path = str(log_dir / f"worker-{variant}.log")
    sids = [f"{variant}-{i}" for i in range(count)]
    if variant == "backoff":
        for sid in sids:  # before the claims: the first connection already gets the 500
            upstream.configure(sid, mode="status:500")
    backoff = {"LP_BACKOFF_BASE": str(opts.backoff), "LP_BACKOFF_CAP": str(opts.backoff)}
    rig.flush(redis_url)
    proc = rig.start_worker(
        children, redis_url, worker_id=WORKER_ID, capacity=max(count, opts.capacity),
        lease_ttl=opts.lease_ttl, log_path=Path(result.worker.log_path),
        extra_env=backoff if variant == "backoff" else None,
    )  # fmt: skip
    sync = rig.plain_client(redis_url)
    try:
        process = psutil.Process(proc.pid)
        asyncio.run(_drive(result, sids, process, proc, upstream, redis_url, opts))
        if proc.poll() is not None:
            raise rig.BenchError(
                f"worker died with {proc.returncode}: see {result.worker.log_path}"
            )
        load = sync.hget(keys.worker_key(WORKER_ID), "load")
        result.worker_load_after = load.decode() if isinstance(load, bytes) else "?"
    finally:
        result.worker.stop(proc, 30)
        sync.close()
    result.worker.scan(_VARIABLE, lambda m: "<sid>" if m["sid"] else "#")
    return result


async def _drive(
    result: VariantResult,
    sids: Sequence[str],
    process: psutil.Process,
    proc: subprocess.Popen[bytes],
    upstream: SSEUpstream,
    redis_url: str,
    opts: argparse.Namespace,
) -> None:
    variant, count = result.variant, result.count
    want = "listening" if variant == "listening" else "backoff"
    sessions = rig.Sessions(redis_url, lease_ttl=opts.lease_ttl)
    try:
        started = time.monotonic()
        result.claims = await sessions.claim(sids, upstream.url)
        await sessions.wait_for(
            sids, timeout=opts.bringup_timeout, state=want, workers=[proc], since=started
        )
        result.bringup_seconds = time.monotonic() - started
        await asyncio.sleep(opts.settle)  # let the bring-up's work (first events, logs) pass
        result.states_before = await sessions.states(sids)
        print(
            f"  {variant}: {count} sessions {want} after {result.bringup_seconds:.1f}s "
            f"({dict(result.states_before)}); cancelling {opts.concurrency} at a time",
            flush=True,
        )
        watcher: Watcher = (
            DisconnectWatcher(opts.poll, upstream)
            if variant == "listening"
            else StoppedWatcher(opts.poll, sessions.redis)
        )
        cpu_before = rig.cpu_seconds(process)
        started = time.monotonic()
        await cancel_all(sessions.control, sids, watcher, opts.concurrency, result)
        result.cancel_seconds = time.monotonic() - started
        busy = rig.cpu_seconds(process) - cpu_before
        result.worker_cpu_percent = 100 * busy / max(result.cancel_seconds, 1e-9)
        # One renewal round later the worker's heartbeat reports its load.
        await asyncio.sleep(sessions.settings.renew_interval + 0.5)
        result.states_after = await sessions.states(sids)
        result.upstream_open_after = sum(upstream.stats(s).concurrent for s in sids)
    finally:
        await sessions.aclose()


_VARIABLE = re.compile(r"(?P<sid>\b(listening|backoff)-\d+)|\d+(\.\d+)?")


# ============================================================================================
# Report
# ============================================================================================
def ms(seconds: float) -> str:
    return "timeout" if math.isinf(seconds) else f"{seconds * 1000:.1f}"


def spread(values: Sequence[float]) -> str:
    return "  ".join(
        f"{name} {ms(rig.percentile(values, q, math.nan)):>7}"
        for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    )


def print_report(results: Sequence[VariantResult], opts: argparse.Namespace, machine: str) -> None:
    print()
    print(f"cancel latency -- {machine}")
    print("(absolute latency against a fixed target: no baseline is measured)")
    for r in results:
        what = (
            "cancel() -> upstream sees the disconnect"
            if r.variant == "listening"
            else "cancel() -> state stopped and lease released (polled)"
        )
        print()
        print(f"{r.variant}: {r.count} cancels, {r.concurrency} at a time; {what}")
        print(f"  latency ms       {spread(r.latencies)}")
        print(f"  cancel() call ms {spread(r.calls)}")
        print(
            f"  {r.missed} not done within {TIMEOUT:g}s, {r.unknown} unknown to cancel(); "
            f"{len(r.latencies)} cancels took {r.cancel_seconds:.1f}s, worker CPU "
            f"{r.worker_cpu_percent:.0f}% of one core meanwhile"
        )
        print(
            f"  claims {dict(r.claims)}, bring-up {r.bringup_seconds:.1f}s; states before "
            f"{dict(r.states_before)}, after {dict(r.states_after)}; upstream connections "
            f"still open {r.upstream_open_after}; worker load after {r.worker_load_after}"
        )
        print(f"  worker stopped {r.worker.stopped()}")
        r.worker.print_patterns()
    print()
    for r in results:
        p99 = rig.percentile(r.latencies, 99, math.nan)
        ok = p99 * 1000 <= opts.target_ms and r.missed == 0 and r.unknown == 0
        rig.figure(
            f"cancel_p99_{r.variant}",
            f"{ms(p99)} ms",
            f"target <= {opts.target_ms:g} ms over {len(r.latencies)} cancels",
            ok,
        )


def write_csv(path: str, results: Sequence[VariantResult]) -> None:
    """One line per cancel; times are ``time.monotonic()`` (CLOCK_MONOTONIC, so comparable
    with timestamps taken in the worker process)."""
    with open(path, "w", encoding="utf-8") as out:
        out.write("variant,sid,t0,call_returned,done,latency_ms\n")
        for r in results:
            for sid, t0, t1, done in r.records:
                out.write(f"{r.variant},{sid},{t0:.6f},{t1:.6f},{done:.6f},{ms(done - t0)}\n")
    print(f"(per-cancel records in {path})")


# ============================================================================================
# Main
# ============================================================================================
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    parser.add_argument("--variant", choices=(*VARIANTS, "both"), default="both")
    parser.add_argument(
        "--count",
        type=int,
        default=0,
        help=f"cancels per variant (listening {COUNT_LISTENING}, backoff {COUNT_BACKOFF})",
    )
    parser.add_argument("--concurrency", type=int, default=1, help="cancels in flight (1)")
    parser.add_argument("--rate", type=float, default=RATE, help="upstream events/s (1)")
    parser.add_argument("--backoff", type=float, default=BACKOFF, help="backoff base/cap (30)")
    parser.add_argument("--poll", type=float, default=0.001, help="completion poll period (s)")
    parser.add_argument("--settle", type=float, default=2.0, help="wait after bring-up (2 s)")
    parser.add_argument("--capacity", type=int, default=0, help="LP_WORKER_CAPACITY (count)")
    parser.add_argument("--lease-ttl", type=float, default=LEASE_TTL, help="LP_LEASE_TTL (10)")
    parser.add_argument(
        "--bringup-timeout", type=float, default=180.0, help="max s to all up (180)"
    )
    parser.add_argument("--target-ms", type=float, default=TARGET_MS, help="p99 target (50)")
    parser.add_argument("--log-dir", default="", help="keep worker logs here (default: temp)")
    parser.add_argument(
        "--csv", default="", help="write every cancel (variant, sid, t0, t1, done) here"
    )
    opts = parser.parse_args(argv)
    if opts.concurrency < 1 or opts.count < 0:
        parser.error("--concurrency must be >= 1 and --count >= 0")
    return opts


def run(opts: argparse.Namespace) -> int:
    from listenerpool.testing.upstream import SSEUpstream

    variants = VARIANTS if opts.variant == "both" else (opts.variant,)
    defaults = {"listening": COUNT_LISTENING, "backoff": COUNT_BACKOFF}
    counts = {v: opts.count or defaults[v] for v in variants}
    machine = rig.machine_line()
    print(
        f"cancel bench: {counts}, concurrency {opts.concurrency}, upstream {opts.rate:g} "
        f"events/s, lease ttl {opts.lease_ttl:g}s, {machine}",
        flush=True,
    )
    results: list[VariantResult] = []
    with rig.Rig(opts.log_dir, "lp-cancel-") as bench:
        server = bench.redis()
        upstream = bench.start(SSEUpstream(rate=opts.rate, heartbeat=HEARTBEAT))
        print(f"redis {server.url}, upstream 127.0.0.1:{upstream.port} (in-process)", flush=True)
        for variant in variants:
            print(f"{variant}: worker + {counts[variant]} sessions", flush=True)
            results.append(
                run_variant(
                    bench.children, upstream, server.url, variant, counts[variant], opts,
                    bench.log_dir,
                )
            )  # fmt: skip
        print_report(results, opts, machine)
        if opts.csv:
            write_csv(opts.csv, results)
        if not opts.log_dir:
            print("(worker logs were in a temporary directory; keep them with --log-dir)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return rig.run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
