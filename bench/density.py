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

Its own ``redis-server`` runs on a free port and the upstream (:class:`SSEUpstream` with no
events and a heartbeat every 15 s, i.e. idle streams) runs in a separate child process, so the
measured processes hold nothing but what is measured. Figures come last, one per line::

    rss_per_listener_ratio_10000: 4.1x (target <= 4x vs bare asyncio sockets) FAIL

Exit status 0 even when a target is missed (this is a measurement); non-zero when the run itself
breaks (a child does not start, Redis fails, ...). Every child is stopped on exit, Ctrl-C
included, and dies with the bench even if the bench is killed (``PR_SET_PDEATHSIG``).

    .venv/bin/python bench/density.py --sizes 1000,10000 --hold 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parent's imports; the bare-socket child must stay lean
    import psutil

    from listenerpool.control import SessionControl

ROOT = Path(__file__).resolve().parent.parent
WORKER_ID = "bench-w1"
LEASE_TTL = 10.0
IDLE_TIMEOUT = 60.0
HEARTBEAT = 15.0
TARGET_RATIO = 4.0
PR_SET_PDEATHSIG = 1
STATE_CHUNK = 2000  # HGETs per pipeline when polling session states


# ============================================================================================
# Children (run as `density.py _upstream` / `density.py _bare`): stdlib + the upstream only.
# ============================================================================================
def upstream_child(heartbeat: float) -> int:
    """Serve idle SSE streams; answer ``count PREFIX`` on stdin with three numbers: open
    connections in total, open ones of sessions starting with PREFIX, and how many connections
    those sessions ever opened. Exits on ``quit`` or EOF (the bench is gone)."""
    from listenerpool.testing.upstream import SSEUpstream

    upstream = SSEUpstream(total=0, heartbeat=heartbeat)  # no events: heartbeats only
    upstream.start()
    print(f"port {upstream.port}", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "quit":
                break
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


def bare_child(port: int, count: int, prefix: str, batch: int) -> int:
    """Print ``ready`` (imports done), wait for ``go``, open ``count`` connections, print
    ``up OPENED FAILED``, then hold them until stdin says anything or closes."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    return asyncio.run(_hold_bare(port, count, prefix, batch))


async def _hold_bare(port: int, count: int, prefix: str, batch: int) -> int:
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
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    f"GET /events/{prefix}{i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
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
# Process plumbing
# ============================================================================================
def _child_setup() -> None:
    """In a child between fork and exec: take the whole fd allowance and die with the bench."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class BenchError(Exception):
    """The run itself broke (as opposed to a target being missed)."""


class Children:
    """Every child process the bench started; :meth:`close` stops whatever still runs."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        # Spawned from the main thread only: PR_SET_PDEATHSIG fires when the *thread* that
        # forked ends. Own session: a terminal's Ctrl-C reaches the bench, which stops children.
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.PIPE,
            stdout=log if log is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT if log is not None else None,
            env=env,
            cwd=ROOT,
            bufsize=0,
            preexec_fn=_child_setup,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> float:
        """SIGTERM, then SIGKILL after ``timeout``; returns seconds until it exited."""
        started = time.monotonic()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        return time.monotonic() - started

    def close(self) -> None:
        for proc in reversed(self._procs):
            self.stop(proc, timeout=3.0)
        self._procs.clear()


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """One line of the child's (unbuffered) stdout, or BenchError after ``timeout``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
            raise BenchError(f"{what}: no answer within {timeout:g}s")
        byte = proc.stdout.read(1)
        if not byte:
            raise BenchError(f"{what}: child exited with {proc.wait()}")
        line += byte
    return line.decode().strip()


def send_line(proc: subprocess.Popen[bytes], text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text.encode() + b"\n")


class UpstreamProcess:
    """The test upstream in its own process."""

    def __init__(self, children: Children, heartbeat: float) -> None:
        self.proc = children.spawn(
            [sys.executable, __file__, "_upstream", "--heartbeat", str(heartbeat)]
        )
        words = read_line(self.proc, 30, "upstream start").split()
        if len(words) != 2 or words[0] != "port":
            raise BenchError(f"upstream start: unexpected {words!r}")
        self.port = int(words[1])

    def url(self, sid: str) -> str:
        return f"http://127.0.0.1:{self.port}/events/{sid}"

    def count(self, prefix: str) -> tuple[int, int, int]:
        """(open connections, open ones of ``prefix*`` sessions, ever opened by them)."""
        send_line(self.proc, f"count {prefix}")
        total, concurrent, opened = read_line(self.proc, 30, "upstream count").split()
        return int(total), int(concurrent), int(opened)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the upstream holds no connection (the previous phase's are gone)."""
        deadline = time.monotonic() + timeout
        while self.count("")[0] > 0:
            if time.monotonic() > deadline:
                raise BenchError(f"upstream still holds {self.count('')[0]} connections")
            time.sleep(0.2)


def rss(process: psutil.Process) -> int:
    return int(process.memory_info().rss)


def kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


# ============================================================================================
# Phase 1: bare asyncio sockets
# ============================================================================================
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


def run_bare(children: Children, upstream: UpstreamProcess, size: int, batch: int) -> BareResult:
    import psutil

    prefix = f"bare-{size}-"
    proc = children.spawn(
        [
            sys.executable, __file__, "_bare", "--port", str(upstream.port),
            "--count", str(size), "--prefix", prefix, "--batch", str(batch),
        ]
    )  # fmt: skip
    try:
        if read_line(proc, 30, "bare child start") != "ready":
            raise BenchError("bare child: unexpected greeting")
        process = psutil.Process(proc.pid)
        time.sleep(0.3)
        before = rss(process)
        send_line(proc, "go")
        words = read_line(proc, 60 + size / 100, "bare child connections").split()
        if len(words) != 3 or words[0] != "up":
            raise BenchError(f"bare child: unexpected {words!r}")
        time.sleep(1.0)  # let the heads and first reads settle
        after = rss(process)
        _, seen, _ = upstream.count(prefix)
        send_line(proc, "exit")
        proc.wait(30)
    finally:
        Children.stop(proc)
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
    worker_exit: int | None = None
    cpu_percent_hold: float = 0.0
    fds: int = 0
    drain_seconds: float = 0.0
    log_levels: Counter[str] = field(default_factory=Counter)
    log_patterns: Counter[str] = field(default_factory=Counter)
    log_path: str = ""

    @property
    def per_listener(self) -> float:
        """RSS growth per session actually listening: the larger of the figure right after
        bring-up and the one after the hold (a partial bring-up divides by fewer)."""
        up = (self.rss_up - self.rss_idle) / max(self.states_after_bringup["listening"], 1)
        held = (self.rss_hold - self.rss_idle) / max(self.listening_end, 1)
        return max(up, held if self.rss_hold else 0.0)


def worker_env(redis_url: str, capacity: int, lease_ttl: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LP_")}
    env.update(
        LP_REDIS_URL=redis_url,
        LP_WORKER_CAPACITY=str(capacity),
        LP_LEASE_TTL=str(lease_ttl),
        LP_IDLE_TIMEOUT=str(IDLE_TIMEOUT),
        LP_WORKER_ID=WORKER_ID,
        LP_LOG_LEVEL="INFO",
    )
    return env


def run_pool(
    children: Children,
    upstream: UpstreamProcess,
    redis_url: str,
    size: int,
    opts: argparse.Namespace,
    log_dir: Path,
) -> PoolResult:
    import psutil
    import redis

    from listenerpool import keys

    sync = redis.Redis.from_url(redis_url)
    try:
        sync.flushall()
        result = PoolResult(size, log_path=str(log_dir / f"worker-{size}.log"))
        with open(result.log_path, "wb") as log:
            proc = children.spawn(
                [sys.executable, "-m", "workers"],
                env=worker_env(redis_url, opts.capacity or size, opts.lease_ttl),
                log=log,
            )
        try:
            deadline = time.monotonic() + 30
            while not sync.exists(keys.worker_key(WORKER_ID)):
                if proc.poll() is not None:
                    raise BenchError(f"worker exited with {proc.returncode}: see {log.name}")
                if time.monotonic() > deadline:
                    raise BenchError(f"worker did not register within 30s: see {log.name}")
                time.sleep(0.05)
            process = psutil.Process(proc.pid)
            time.sleep(1.0)
            result.rss_idle = result.rss_peak = rss(process)
            asyncio.run(_drive_pool(result, process, proc, upstream, redis_url, opts))
            result.worker_alive = proc.poll() is None
            result.fds = process.num_fds() if result.worker_alive else 0
        finally:
            result.drain_seconds = Children.stop(proc, timeout=opts.drain_timeout)
            result.worker_exit = proc.returncode
        upstream.wait_idle(60)
    finally:
        sync.close()
    scan_log(result)
    return result


async def _drive_pool(
    result: PoolResult,
    process: psutil.Process,
    proc: subprocess.Popen[bytes],
    upstream: UpstreamProcess,
    redis_url: str,
    opts: argparse.Namespace,
) -> None:
    from listenerpool import keys
    from listenerpool.connections import async_redis, listen_queue, sync_redis
    from listenerpool.control import SessionControl
    from listenerpool.settings import load_settings

    size = result.size
    prefix = f"pool-{size}-"
    sids = [f"{prefix}{i}" for i in range(size)]
    state_keys = [keys.SessionKeys(sid).state for sid in sids]
    settings = load_settings(
        redis_url=redis_url,
        lease_ttl=opts.lease_ttl,
        idle_timeout=IDLE_TIMEOUT,
        worker_capacity=opts.capacity or size,
    )
    aredis = async_redis(settings)
    sync = sync_redis(settings)
    try:
        control = SessionControl(aredis, listen_queue(sync, settings), settings)
        started = time.monotonic()
        await _claim_all(control, upstream, sids, opts.batch, result.claims)
        result.claim_seconds = time.monotonic() - started
        print(
            f"  pool {size}: {size} claims in {result.claim_seconds:.1f}s "
            f"({dict(result.claims)}); waiting for listening",
            flush=True,
        )
        deadline = started + opts.bringup_timeout
        states: Counter[str] = Counter()
        last_report = time.monotonic()
        last_cpu = _cpu_seconds(process)
        queue_key = f"rq:queue:{settings.queue_name}"
        while time.monotonic() < deadline and proc.poll() is None:
            states = await count_states(aredis, state_keys)
            result.rss_peak = max(result.rss_peak, rss(process))
            if states["listening"] == size:
                result.bringup_seconds = time.monotonic() - started
                break
            if (now := time.monotonic()) - last_report >= 10:
                cpu = _cpu_seconds(process)
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
        cpu_before = _cpu_seconds(process)
        hold_start = time.monotonic()
        hold_end = hold_start + opts.hold
        while (now := time.monotonic()) < hold_end and proc.poll() is None:
            await asyncio.sleep(min(opts.sample, hold_end - now))
            if proc.poll() is not None:
                break
            states = await count_states(aredis, state_keys)
            result.min_listening = min(result.min_listening, states["listening"])
            result.rss_peak = max(result.rss_peak, rss(process))
        result.held_seconds = time.monotonic() - hold_start
        if proc.poll() is None:
            busy = _cpu_seconds(process) - cpu_before
            result.cpu_percent_hold = 100 * busy / max(result.held_seconds, 1e-9)
            result.rss_hold = rss(process)
        result.states_end = states = await count_states(aredis, state_keys)
        result.listening_end = states["listening"]
        _, result.upstream_open_end, result.upstream_opened = await asyncio.to_thread(
            upstream.count, prefix
        )
    finally:
        await aredis.aclose()
        sync.close()


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _claim_all(
    control: SessionControl,
    upstream: UpstreamProcess,
    sids: Sequence[str],
    batch: int,
    outcomes: Counter[str],
) -> None:
    for start in range(0, len(sids), batch):
        chunk = sids[start : start + batch]
        results = await asyncio.gather(*(control.claim(sid, upstream.url(sid)) for sid in chunk))
        outcomes.update(r.outcome.value for r in results)


async def count_states(redis: Any, state_keys: Sequence[str]) -> Counter[str]:
    """How many sessions are in each state (``none`` = no state hash yet)."""
    counts: Counter[str] = Counter()
    for start in range(0, len(state_keys), STATE_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for key in state_keys[start : start + STATE_CHUNK]:
                pipe.hget(key, "state")
            for value in await pipe.execute():
                counts[value.decode() if value else "none"] += 1
    return counts


_LOG_LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")
_VARIABLE = re.compile(r"(?P<sid>(pool|bare)-\d+-\d+)|(?P<job>\blp-[\w.-]+)|\d+(\.\d+)?")


def _shape(match: re.Match[str]) -> str:
    return "<sid>" if match["sid"] else "<job>" if match["job"] else "#"


def scan_log(result: PoolResult) -> None:
    """Count the worker's log lines by level and its warnings/errors by message shape."""
    with open(result.log_path, encoding="utf-8", errors="replace") as log:
        for line in log:
            if line.startswith("Traceback"):
                result.log_levels["TRACEBACK"] += 1
                continue
            match = _LOG_LINE.match(line.rstrip("\n"))
            if match is None:
                continue
            level, logger, message = match.groups()
            result.log_levels[level] += 1
            if level not in ("DEBUG", "INFO"):
                shape = _VARIABLE.sub(_shape, message)
                result.log_patterns[f"{level} {logger}: {shape[:160]}"] += 1


# ============================================================================================
# Report
# ============================================================================================
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


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
            f"{pool.size:>6}  {kib(bare.per_conn):>12}  {kib(pool.per_listener):>16}  "
            f"{ratio:>5.1f}x  {up_s:>10}  {f'{pool.listening_end}/{pool.size}':>20}  "
            f"{rss_cols + ' MiB':>26}"
        )
    for bare, pool in rows:
        n = pool.size
        print()
        print(f"N={n} details:")
        print(
            f"  bare: {bare.opened} open, {bare.failed} failed, upstream saw {bare.upstream_seen}; "
            f"RSS {mib(bare.rss_before)} -> {mib(bare.rss_after)}"
        )
        print(
            f"  pool: claims {dict(pool.claims)} in {pool.claim_seconds:.1f}s; states after "
            f"bring-up {dict(pool.states_after_bringup)}; at the end {dict(pool.states_end)}"
        )
        print(
            f"  pool: worker RSS idle {mib(pool.rss_idle)}, all up {mib(pool.rss_up)}, after "
            f"hold {mib(pool.rss_hold)}, peak {mib(pool.rss_peak)}; {pool.fds} fds; "
            f"upstream connections open {pool.upstream_open_end}, ever opened "
            f"{pool.upstream_opened}; min listening during hold {pool.min_listening}"
        )
        print(
            f"  pool: worker stopped (SIGTERM, drain) in {pool.drain_seconds:.1f}s, exit "
            f"{pool.worker_exit}; log {dict(pool.log_levels)} ({pool.log_path})"
        )
        for pattern, count in pool.log_patterns.most_common(8):
            print(f"    {count:>6} x {pattern}")
    print()
    for bare, pool in rows:
        n = pool.size
        ratio = pool.per_listener / bare.per_conn if bare.per_conn > 0 else float("inf")
        all_held = pool.worker_alive and pool.listening_end == n
        bringup = pool.bringup_seconds
        print(f"rss_per_conn_bare_{n}: {kib(bare.per_conn)} KB (info)")
        print(f"rss_per_listener_{n}: {kib(pool.per_listener)} KB (info)")
        partial = "" if pool.listening_end == n else f", on {pool.listening_end} listening"
        print(
            f"rss_per_listener_ratio_{n}: {ratio:.1f}x (target <= {opts.target_ratio:g}x vs bare "
            f"asyncio sockets{partial}) {verdict(ratio <= opts.target_ratio)}"
        )
        if bringup is not None:
            print(f"bringup_{n}: {bringup:.1f}s (info)")
        else:
            print(
                f"bringup_{n}: {pool.states_after_bringup['listening']}/{n} listening after "
                f"{opts.bringup_timeout:g}s (target all) FAIL"
            )
        alive = "worker alive" if pool.worker_alive else "worker DEAD"
        print(
            f"hold_{n}: {pool.listening_end}/{n} listening after {pool.held_seconds:.0f}s, "
            f"{alive} (target all) {verdict(all_held)}"
        )
        print(f"worker_cpu_hold_{n}: {pool.cpu_percent_hold:.1f}% of one core (info)")
        closed = pool.upstream_opened - pool.upstream_open_end
        print(f"upstream_conns_closed_{n}: {closed} of {pool.upstream_opened} opened (info)")
        print(
            f"drain_{n}: worker exited {pool.worker_exit} {pool.drain_seconds:.1f}s after SIGTERM "
            f"(info; -9 = killed after --drain-timeout {opts.drain_timeout:g}s)"
        )
        problems = sum(c for level, c in pool.log_levels.items() if level not in ("INFO", "DEBUG"))
        print(f"worker_log_problems_{n}: {problems} warning/error lines (info)")


def machine_line() -> str:
    model = "unknown cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {model}, Python {sys.version.split()[0]}"


# ============================================================================================
# Main
# ============================================================================================
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="child")  # internal: the child processes
    up = sub.add_parser("_upstream")
    up.add_argument("--heartbeat", type=float, default=HEARTBEAT)
    bare = sub.add_parser("_bare")
    bare.add_argument("--port", type=int, required=True)
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
    parser.add_argument("--target-ratio", type=float, default=TARGET_RATIO, help="(4)")
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


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_guarded(run: Callable[[argparse.Namespace], int], opts: argparse.Namespace) -> int:
    """Run a bench so that Ctrl-C, SIGTERM and SIGHUP stop its children (through the ``finally``
    blocks of ``run``) and a broken run exits 1 with one line."""
    # SIGINT too: a shell starts background jobs with it ignored, and Ctrl-C must still clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    try:
        return run(opts)
    except KeyboardInterrupt:
        print("\ninterrupted; children stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def log_directory(given: str) -> Iterator[Path]:
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="lp-density-") as tmp:
            yield Path(tmp)


def run(opts: argparse.Namespace) -> int:
    from listenerpool.testing.redis_server import RedisServer

    sizes = sizes_of(opts.sizes)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < max(sizes) + 256:
        raise BenchError(f"fd hard limit {hard} is too low for {max(sizes)} connections")
    machine = machine_line()
    print(
        f"density bench: sizes {sizes}, hold {opts.hold:g}s, lease ttl {opts.lease_ttl:g}s, "
        f"{machine}",
        flush=True,
    )
    children = Children()
    server = RedisServer()
    rows: list[tuple[BareResult, PoolResult]] = []
    try:
        server.start()
        upstream = UpstreamProcess(children, opts.heartbeat)
        print(f"redis {server.url}, upstream 127.0.0.1:{upstream.port}", flush=True)
        with log_directory(opts.log_dir) as log_dir:
            for size in sizes:
                print(f"N={size}: bare asyncio sockets", flush=True)
                bare = run_bare(children, upstream, size, opts.batch)
                print(f"  bare {size}: {kib(bare.per_conn)} KB/conn", flush=True)
                print(f"N={size}: pool worker", flush=True)
                pool = run_pool(children, upstream, server.url, size, opts, log_dir)
                print(f"  pool {size}: {kib(pool.per_listener)} KB/listener", flush=True)
                rows.append((bare, pool))
            print_report(rows, opts, machine)
            if not opts.log_dir:
                print("(worker logs were in a temporary directory; keep them with --log-dir)")
    finally:
        children.close()
        server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child == "_upstream":
        return upstream_child(opts.heartbeat)
    if opts.child == "_bare":
        return bare_child(opts.port, opts.count, opts.prefix, opts.batch)
    return run_guarded(run, opts)


if __name__ == "__main__":
    sys.exit(main())
