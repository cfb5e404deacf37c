"""Density: how many idle listeners one worker process holds, and what each one costs.

For every N in ``--sizes`` this bench measures, one after the other (never both at once, so the
file descriptor limit holds):

1. **bare** -- a child process holding N plain ``asyncio.open_connection`` sockets to the test
   upstream, each with the same ``GET /events/{sid}`` / ``Accept: text/event-stream`` request
   and one task reading from it: its RSS growth per connection is the baseline.
2. **pool** -- a ``python -m workers`` child process; the bench claims N sessions through
   :class:`listenerpool.control.SessionControl` and waits until every ``lp:{sid}:state`` says
   ``listening``; the worker's RSS growth per listener, the bring-up time and, after ``--hold``
   seconds, whether all N are still listening in a live worker.
3. **busy** -- then the upstreams send ``--busy-events-per-s`` (1,000) events/s spread evenly
   over the N sessions (each stream's first event staggered over one period) for
   ``--busy-seconds`` (15): the worker's CPU over that window per event it published (the
   sessions' ``seq``), holding included, with what it is beyond the idle hold's CPU beside it.
   At N = 1,000 that is 1,000 sessions at 1 event/s each.

Its own ``redis-server`` runs on a free port and the upstreams (:class:`SSEUpstream` with no
events and a heartbeat every 15 s, i.e. idle streams) run in child processes of their own, one
per 10,000 connections, each on its own loopback address (127.0.0.1, 127.0.0.2, ...: one
destination has about 28,000 ephemeral ports), so the measured processes hold nothing but what
is measured. One process holds N sockets, so N is bounded by the hard limit of open files: the
bench raises it where it may (root with CAP_SYS_RESOURCE) and reports a size above it as not
measured, with the limit. Figures come last, one per line::

    rss_per_listener_ratio_10000: 2.1x (target <= 2x vs bare asyncio sockets) FAIL
    worker_cpu_per_event_10000: 250 us (target <= 60 us; 1000 events/s offered over ...) FAIL

Exit status 0 even when a target is missed (this is a measurement); non-zero when the run itself
breaks (a child does not start, Redis fails, ...). Every child is stopped on exit, Ctrl-C
included, and dies with the bench even if the bench is killed (``PR_SET_PDEATHSIG``).

    .venv/bin/python bench/density.py --sizes 1000,10000 --hold 10
    .venv/bin/python bench/density.py --sizes 19000,50000 --hold 600 --bringup-timeout 600
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# bench/ is sys.path[0] when this file runs as a script. Standard library only at import time:
# the bare-socket child must stay lean.
import rig
from rig_upstreams import CONNECTIONS_PER_UPSTREAM, HEARTBEAT, UpstreamSpread, spread_index

if TYPE_CHECKING:
    import psutil

WORKER_ID = "bench-w1"
LEASE_TTL = 10.0
RESERVED_FILES = 256  # a measured process's own files besides its N sockets (as the worker's)
TARGET_RATIO = 2.0
BUSY_EVENTS_PER_S = 1000.0
TARGET_CPU_US = 60.0


# ============================================================================================
# The bare-socket child (run as `density.py _bare`): stdlib only.
# ============================================================================================
def bare_child(targets: str, count: int, prefix: str, batch: int) -> int:
    """Print ``ready`` (imports done), wait for ``go``, open ``count`` connections, print
    ``up OPENED FAILED``, then hold them until stdin says anything or closes."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    hosts = [(host, int(port)) for host, _, port in (t.rpartition(":") for t in targets.split(","))]
    return asyncio.run(_hold_bare(hosts, count, prefix, batch))


async def _hold_bare(hosts: list[tuple[str, int]], count: int, prefix: str, batch: int) -> int:
    loop = asyncio.get_running_loop()
    release: asyncio.Future[None] = loop.create_future()

    def on_stdin() -> None:
        os.read(sys.stdin.fileno(), 4096)
        if not release.done():
            release.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)  # no thread: it would count in the RSS
    writers: list[asyncio.StreamWriter] = []
    failures: list[str] = []
    async with asyncio.TaskGroup() as tg:
        readers: list[asyncio.Task[None]] = []

        async def open_one(i: int) -> None:
            sid = f"{prefix}{i}"
            host, port = hosts[spread_index(sid, len(hosts))]  # the pool's reader's upstream
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(
                    f"GET /events/{sid} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n".encode()
                )
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            if not head.startswith(b"HTTP/1.1 200"):
                failures.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                writer.close()
                return
            writers.append(writer)
            readers.append(tg.create_task(_read_forever(reader)))

        for start in range(0, count, batch):
            await asyncio.gather(*(open_one(i) for i in range(start, min(start + batch, count))))
        for failure in failures[:3]:
            print(f"bare connection failed: {failure}", file=sys.stderr)
        print(f"up {len(writers)} {len(failures)}", flush=True)
        await release
        for task in readers:
            task.cancel()
    for writer in writers:
        writer.close()
    return 0


async def _read_forever(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


# ============================================================================================
# Phase 1: bare asyncio sockets
# ============================================================================================
def rss(process: psutil.Process) -> int:
    return int(process.memory_info().rss)


@dataclass
class BareResult:
    size: int
    opened: int
    failed: int
    upstream_seen: int
    rss_before: int
    rss_after: int

    @property
    def per_conn(self) -> float:
        return (self.rss_after - self.rss_before) / max(self.opened, 1)


def run_bare(children: rig.Children, upstream: UpstreamSpread, size: int, batch: int) -> BareResult:
    import psutil

    prefix = f"bare-{size}-"
    proc = children.spawn(
        [
            sys.executable, __file__, "_bare", "--targets", upstream.targets(),
            "--count", str(size), "--prefix", prefix, "--batch", str(batch),
        ]
    )  # fmt: skip
    try:
        if rig.read_line(proc, 30, "bare child start") != "ready":
            raise rig.BenchError("bare child: unexpected greeting")
        process = psutil.Process(proc.pid)
        time.sleep(0.3)
        before = rss(process)
        rig.send_line(proc, "go")
        words = rig.read_line(proc, 60 + size / 100, "bare child connections").split()
        if len(words) != 3 or words[0] != "up":
            raise rig.BenchError(f"bare child: unexpected {words!r}")
        time.sleep(1.0)  # let the heads and first reads settle
        after = rss(process)
        _, seen, _ = upstream.count(prefix)
        rig.send_line(proc, "exit")
        proc.wait(30)
    finally:
        rig.Children.stop(proc)
    upstream.wait_idle()
    return BareResult(size, int(words[1]), int(words[2]), seen, before, after)


# ============================================================================================
# Phase 2: the pool
# ============================================================================================
@dataclass
class PoolResult:
    size: int
    rss_idle: int = 0
    rss_up: int = 0
    rss_peak: int = 0
    rss_hold: int = 0
    claims: Counter[str] = field(default_factory=Counter)
    claim_seconds: float = 0.0
    bringup_seconds: float | None = None
    states_after_bringup: Counter[str] = field(default_factory=Counter)
    held_seconds: float = 0.0
    min_listening: int = 0
    listening_end: int = 0
    states_end: Counter[str] = field(default_factory=Counter)
    upstream_open_end: int = 0
    upstream_opened: int = 0
    worker_alive: bool = False
    cpu_percent_hold: float = 0.0
    busy_switched: int = 0  # sessions whose upstream sent events in the busy phase
    busy_events: int = 0  # events the worker published over the busy window
    busy_seconds: float = 0.0
    busy_cpu_seconds: float = 0.0
    fds: int = 0
    worker: rig.WorkerEnd = field(default_factory=rig.WorkerEnd)

    @property
    def per_listener(self) -> float:
        """RSS growth per session actually listening: the larger of the figure right after
        bring-up and the one after the hold (a partial bring-up divides by fewer)."""
        up = (self.rss_up - self.rss_idle) / max(self.states_after_bringup["listening"], 1)
        held = (self.rss_hold - self.rss_idle) / max(self.listening_end, 1)
        return max(up, held if self.rss_hold else 0.0)

    @property
    def cpu_per_event(self) -> float:
        """Worker CPU seconds per event published over the busy window, holding included."""
        return self.busy_cpu_seconds / self.busy_events if self.busy_events else math.inf

    @property
    def cpu_per_event_beyond_hold(self) -> float:
        """The same less what holding the sessions idle cost over as long."""
        if not self.busy_events:
            return math.inf
        holding = self.cpu_percent_hold / 100 * self.busy_seconds
        return (self.busy_cpu_seconds - holding) / self.busy_events


def run_pool(
    children: rig.Children,
    upstream: UpstreamSpread,
    redis_url: str,
    size: int,
    opts: argparse.Namespace,
    log_dir: Path,
) -> PoolResult:
    import psutil

    rig.flush(redis_url)
    result = PoolResult(size, worker=rig.WorkerEnd(str(log_dir / f"worker-{size}.log")))
    proc = rig.start_worker(
        children, redis_url, worker_id=WORKER_ID, capacity=opts.capacity or size,
        lease_ttl=opts.lease_ttl, log_path=Path(result.worker.log_path),
    )  # fmt: skip
    try:
        process = psutil.Process(proc.pid)
        time.sleep(1.0)
        result.rss_idle = result.rss_peak = rss(process)
        asyncio.run(_drive_pool(result, process, proc, upstream, redis_url, opts))
        result.worker_alive = proc.poll() is None
        result.fds = process.num_fds() if result.worker_alive else 0
    finally:
        result.worker.stop(proc, opts.drain_timeout)
    upstream.wait_idle(60)
    result.worker.scan(_VARIABLE, _shape)
    return result


async def _drive_pool(
    result: PoolResult,
    process: psutil.Process,
    proc: subprocess.Popen[bytes],
    upstream: UpstreamSpread,
    redis_url: str,
    opts: argparse.Namespace,
) -> None:
    size = result.size
    prefix = f"pool-{size}-"
    sids = [f"{prefix}{i}" for i in range(size)]
    state_keys = rig.state_keys_of(sids)
    sessions = rig.Sessions(
        redis_url,
        lease_ttl=opts.lease_ttl,
        idle_timeout=rig.IDLE_TIMEOUT,
        worker_capacity=opts.capacity or size,
    )
    aredis = sessions.redis
    try:
        if opts.history:
            await asyncio.to_thread(
                rig.write_history, redis_url, sids, opts.history, opts.payload_bytes
            )
        started = time.monotonic()
        result.claims = await sessions.claim(sids, upstream.url, opts.batch)
        result.claim_seconds = time.monotonic() - started
        print(
            f"  pool {size}: {size} claims in {result.claim_seconds:.1f}s "
            f"({dict(result.claims)}); waiting for listening",
            flush=True,
        )
        deadline = started + opts.bringup_timeout
        states: Counter[str] = Counter()
        last_report = time.monotonic()
        last_cpu = rig.cpu_seconds(process)
        queue_key = f"rq:queue:{sessions.settings.queue_name}"
        while time.monotonic() < deadline and proc.poll() is None:
            states = await rig.count_states(aredis, state_keys)
            result.rss_peak = max(result.rss_peak, rss(process))
            if states["listening"] == size:
                result.bringup_seconds = time.monotonic() - started
                break
            if (now := time.monotonic()) - last_report >= 10:
                cpu = rig.cpu_seconds(process)
                busy = 100 * (cpu - last_cpu) / (now - last_report)
                last_report, last_cpu = now, cpu
                queued = await aredis.llen(queue_key)
                print(
                    f"  pool {size}: {now - started:.0f}s {dict(states)}, {queued} jobs queued, "
                    f"worker CPU {busy:.0f}%",
                    flush=True,
                )
            await asyncio.sleep(0.25)
        result.states_after_bringup = states
        if proc.poll() is not None:
            return
        await asyncio.sleep(1.0)
        result.rss_up = rss(process)
        result.rss_peak = max(result.rss_peak, result.rss_up)
        print(f"  pool {size}: holding {opts.hold:g}s", flush=True)
        result.min_listening = states["listening"]
        cpu_before = rig.cpu_seconds(process)
        hold_start = time.monotonic()
        hold_end = hold_start + opts.hold
        while (now := time.monotonic()) < hold_end and proc.poll() is None:
            await asyncio.sleep(min(opts.sample, hold_end - now))
            if proc.poll() is not None:
                break
            states = await rig.count_states(aredis, state_keys)
            result.min_listening = min(result.min_listening, states["listening"])
            result.rss_peak = max(result.rss_peak, rss(process))
        result.held_seconds = time.monotonic() - hold_start
        if proc.poll() is None:
            busy = rig.cpu_seconds(process) - cpu_before
            result.cpu_percent_hold = 100 * busy / max(result.held_seconds, 1e-9)
            result.rss_hold = rss(process)
        if proc.poll() is None and opts.busy_events_per_s > 0:
            await _busy(result, process, upstream, aredis, prefix, state_keys, opts)
        result.states_end = states = await rig.count_states(aredis, state_keys)
        result.listening_end = states["listening"]
        _, result.upstream_open_end, result.upstream_opened = await asyncio.to_thread(
            upstream.count, prefix
        )
    finally:
        await sessions.aclose()


async def _busy(
    result: PoolResult,
    process: psutil.Process,
    upstream: UpstreamSpread,
    redis: Any,
    prefix: str,
    state_keys: Sequence[str],
    opts: argparse.Namespace,
) -> None:
    """The busy phase: the upstreams send ``--busy-events-per-s`` events/s spread evenly over
    the held sessions; the worker's CPU and the events it published (the sessions' ``seq``)
    are read over ``--busy-seconds``, after a second for the flow to settle."""
    size = result.size
    rate = opts.busy_events_per_s / size
    print(
        f"  pool {size}: busy, {opts.busy_events_per_s:g} events/s "
        f"({rate:g} per session) for {opts.busy_seconds:g}s",
        flush=True,
    )
    result.busy_switched = await asyncio.to_thread(upstream.set_events, prefix, rate)
    await asyncio.sleep(1.0)  # the flow settles: not a synchronisation
    events_before = await rig.published_events(redis, state_keys)
    cpu_before = rig.cpu_seconds(process)
    started = time.monotonic()
    await asyncio.sleep(opts.busy_seconds)
    result.busy_cpu_seconds = rig.cpu_seconds(process) - cpu_before
    result.busy_seconds = time.monotonic() - started
    result.busy_events = await rig.published_events(redis, state_keys) - events_before
    await asyncio.to_thread(upstream.set_events, prefix, 0.0)


_VARIABLE = re.compile(r"(?P<sid>(pool|bare)-\d+-\d+)|(?P<job>\blp-[\w.-]+)|\d+(\.\d+)?")


def _shape(match: re.Match[str]) -> str:
    return "<sid>" if match["sid"] else "<job>" if match["job"] else "#"


# ============================================================================================
# Report
# ============================================================================================
def print_report(
    rows: Sequence[tuple[BareResult, PoolResult]], opts: argparse.Namespace, machine: str
) -> None:
    print()
    print(f"density: idle listeners per worker process -- {machine}")
    header = (
        f"{'N':>6}  {'bare KB/conn':>12}  {'pool KB/listener':>16}  {'ratio':>6}  "
        f"{'bring-up s':>10}  {'listening after hold':>20}  {'worker RSS idle/up/hold':>26}"
    )
    print(header)
    print("-" * len(header))
    for bare, pool in rows:
        ratio = pool.per_listener / bare.per_conn if bare.per_conn > 0 else float("inf")
        up_s = f"{pool.bringup_seconds:.1f}" if pool.bringup_seconds is not None else "-"
        rss_cols = "/".join(
            f"{n / 1048576:.0f}" for n in (pool.rss_idle, pool.rss_up, pool.rss_hold)
        )
        print(
            f"{pool.size:>6}  {rig.kib(bare.per_conn):>12}  {rig.kib(pool.per_listener):>16}  "
            f"{ratio:>5.1f}x  {up_s:>10}  {f'{pool.listening_end}/{pool.size}':>20}  "
            f"{rss_cols + ' MiB':>26}"
        )
    for bare, pool in rows:
        n = pool.size
        print()
        print(f"N={n} details:")
        print(
            f"  bare: {bare.opened} open, {bare.failed} failed, upstream saw {bare.upstream_seen}; "
            f"RSS {rig.mib(bare.rss_before)} -> {rig.mib(bare.rss_after)}"
        )
        print(
            f"  pool: claims {dict(pool.claims)} in {pool.claim_seconds:.1f}s; states after "
            f"bring-up {dict(pool.states_after_bringup)}; at the end {dict(pool.states_end)}"
        )
        print(
            f"  pool: worker RSS idle {rig.mib(pool.rss_idle)}, all up {rig.mib(pool.rss_up)}, "
            f"after hold {rig.mib(pool.rss_hold)}, peak {rig.mib(pool.rss_peak)}; {pool.fds} fds; "
            f"upstream connections open {pool.upstream_open_end}, ever opened "
            f"{pool.upstream_opened}; min listening during hold {pool.min_listening}"
        )
        print(f"  pool: worker stopped (SIGTERM, drain) {pool.worker.stopped()}")
        pool.worker.print_patterns()
    print()
    for bare, pool in rows:
        # With history the sessions are not the idle listeners the ratio's target is about:
        # their figures get names of their own and no verdict.
        n = pool.size if not opts.history else f"{pool.size}_history{opts.history}"
        ratio = pool.per_listener / bare.per_conn if bare.per_conn > 0 else float("inf")
        all_held = pool.worker_alive and pool.listening_end == pool.size
        bringup = pool.bringup_seconds
        rig.figure(f"rss_per_conn_bare_{n}", f"{rig.kib(bare.per_conn)} KB")
        rig.figure(f"rss_per_listener_{n}", f"{rig.kib(pool.per_listener)} KB")
        partial = "" if pool.listening_end == pool.size else f", on {pool.listening_end} listening"
        if opts.history:
            note = (
                f"info: vs bare asyncio sockets, each session with {opts.history} events of "
                f"{opts.payload_bytes} bytes of history{partial}"
            )
            verdict = None
        else:
            note = f"target <= {opts.target_ratio:g}x vs bare asyncio sockets{partial}"
            verdict = ratio <= opts.target_ratio
        rig.figure(f"rss_per_listener_ratio_{n}", f"{ratio:.1f}x", note, verdict)
        if bringup is not None:
            rig.figure(f"bringup_{n}", f"{bringup:.1f}s")
        else:
            rig.figure(
                f"bringup_{n}",
                f"{pool.states_after_bringup['listening']}/{pool.size} listening after "
                f"{opts.bringup_timeout:g}s",
                "target all",
                False,
            )
        alive = "worker alive" if pool.worker_alive else "worker DEAD"
        rig.figure(
            f"hold_{n}",
            f"{pool.listening_end}/{pool.size} listening after {pool.held_seconds:.0f}s, {alive}",
            "target all",
            all_held,
        )
        rig.figure(f"worker_cpu_hold_{n}", f"{pool.cpu_percent_hold:.1f}% of one core")
        if opts.busy_events_per_s > 0:
            print_cpu_per_event(pool, n, opts)
        closed = pool.upstream_opened - pool.upstream_open_end
        rig.figure(f"upstream_conns_closed_{n}", f"{closed} of {pool.upstream_opened} opened")
        rig.figure(
            f"drain_{n}",
            f"worker exited {pool.worker.exit} {pool.worker.drain_seconds:.1f}s after SIGTERM",
            f"info; -9 = killed after --drain-timeout {opts.drain_timeout:g}s",
        )
        rig.figure(f"worker_log_problems_{n}", f"{pool.worker.problems} warning/error lines")


def print_cpu_per_event(pool: PoolResult, name: str | int, opts: argparse.Namespace) -> None:
    per_event, beyond = pool.cpu_per_event * 1e6, pool.cpu_per_event_beyond_hold * 1e6
    rig.figure(
        f"worker_cpu_per_event_{name}",
        f"{per_event:.0f} us" if pool.busy_events else "no event published",
        f"target <= {opts.target_cpu_us:g} us; {opts.busy_events_per_s:g} events/s offered over "
        f"{pool.busy_switched} of {pool.size} sessions, {pool.busy_events:,} published in "
        f"{pool.busy_seconds:.1f}s at {100 * pool.busy_cpu_seconds / pool.busy_seconds:.0f}% of "
        f"a core; {beyond:.0f} us beyond holding them idle",
        per_event <= opts.target_cpu_us,
    )


# ============================================================================================
# Main
# ============================================================================================
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    sub = parser.add_subparsers(dest="child")  # internal: the bare-socket child
    bare = sub.add_parser("_bare")
    bare.add_argument("--targets", required=True, help="host:port,... (UpstreamSpread)")
    bare.add_argument("--count", type=int, required=True)
    bare.add_argument("--prefix", required=True)
    bare.add_argument("--batch", type=int, default=64)

    parser.add_argument("--sizes", default="1000,10000", help="comma-separated N (1000,10000)")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold N (10)")
    parser.add_argument("--batch", type=int, default=64, help="concurrent claims/opens (64)")
    parser.add_argument("--capacity", type=int, default=0, help="LP_WORKER_CAPACITY (N)")
    parser.add_argument(
        "--bringup-timeout", type=float, default=180.0, help="max seconds to all listening (180)"
    )
    parser.add_argument("--sample", type=float, default=5.0, help="hold sampling period (5)")
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="SIGTERM drain wait before kill (60)"
    )
    parser.add_argument(
        "--heartbeat", type=float, default=HEARTBEAT, help="upstream heartbeat s (15)"
    )
    parser.add_argument(
        "--lease-ttl", type=float, default=LEASE_TTL, help="LP_LEASE_TTL of worker and claims (10)"
    )
    parser.add_argument("--target-ratio", type=float, default=TARGET_RATIO, help="(2)")
    parser.add_argument(
        "--busy-events-per-s",
        type=rig.rate_arg,
        default=BUSY_EVENTS_PER_S,
        help="after the hold, events/s the upstreams send, spread over the N sessions, for the "
        "worker CPU per event figure (1000; 0: no busy phase)",
    )
    parser.add_argument(
        "--busy-seconds", type=rig.rate_arg, default=15.0, help="busy window in s (15)"
    )
    parser.add_argument(
        "--target-cpu-us", type=float, default=TARGET_CPU_US, help="CPU per event target (60)"
    )
    rig.add_history_options(
        parser,
        "events of history each session has before the worker adopts it (0: none, an idle "
        "listener that never published; the worker keeps up to LP_RESTORE_EVENTS of them)",
    )
    parser.add_argument(
        "--per-upstream",
        type=int,
        default=CONNECTIONS_PER_UPSTREAM,
        help="connections per upstream process and loopback address (10000)",
    )
    parser.add_argument("--log-dir", default="", help="keep worker logs here (default: temp)")
    return parser.parse_args(argv)


def sizes_of(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--sizes: not a list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit("--sizes: give positive integers")
    return sizes


def run(opts: argparse.Namespace) -> int:
    sizes = sizes_of(opts.sizes)
    # Each size is held by one process (the bare child, then the worker): as many sockets as
    # N, and the files of its own. Children inherit the limits raised here.
    hard = rig.raise_fd_limit(max(sizes) + RESERVED_FILES)
    measured = [n for n in sizes if n + RESERVED_FILES <= hard]
    machine = rig.machine_line()
    print(
        f"density bench: sizes {sizes}, hold {opts.hold:g}s, lease ttl {opts.lease_ttl:g}s, "
        f"history {opts.history} events of {opts.payload_bytes} bytes per session, "
        f"open files {hard}, {machine}",
        flush=True,
    )
    rows: list[tuple[BareResult, PoolResult]] = []
    with rig.Rig(opts.log_dir, "lp-density-") as bench:
        server = bench.redis()
        upstream = UpstreamSpread(
            bench.children, max(measured, default=1), opts.heartbeat, per_upstream=opts.per_upstream
        )
        print(f"redis {server.url}, upstreams {upstream.targets()}", flush=True)
        for size in measured:
            print(f"N={size}: bare asyncio sockets", flush=True)
            bare = run_bare(bench.children, upstream, size, opts.batch)
            print(f"  bare {size}: {rig.kib(bare.per_conn)} KB/conn", flush=True)
            print(f"N={size}: pool worker", flush=True)
            pool = run_pool(bench.children, upstream, server.url, size, opts, bench.log_dir)
            print(f"  pool {size}: {rig.kib(pool.per_listener)} KB/listener", flush=True)
            rows.append((bare, pool))
        print_report(rows, opts, machine)
        for size in sizes:
            if size not in measured:
                rig.figure(
                    f"hold_{size}",
                    f"not measured: {size} sockets in one process need about "
                    f"{size + RESERVED_FILES} open files and the hard limit here is {hard} "
                    "(raising it takes privileges this run lacks: run the bench as root with "
                    "CAP_SYS_RESOURCE, or under a higher ulimit -Hn)",
                    "target all",
                    False,
                )
        if not opts.log_dir:
            print("(worker logs were in a temporary directory; keep them with --log-dir)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child == "_bare":
        return bare_child(opts.targets, opts.count, opts.prefix, opts.batch)
    return rig.run_guarded(run, opts)


if __name__ == "__main__":
    sys.exit(main())
