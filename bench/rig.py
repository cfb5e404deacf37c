"""The base every bench stands on: child processes, the guard around a run, the pool's processes
(a private ``redis-server``, workers, gateways), claiming sessions and waiting for their state,
and the figure lines. The upstreams the benches read from are in ``rig_upstreams.py``.

Only the standard library is imported at module level: the benches' lean child processes (the
bare sockets of ``density.py``, the upstreams) import this module too, and anything more would
count in what they measure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import math
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any, Protocol, Self, TypeVar

if TYPE_CHECKING:
    import psutil

    from listenerpool.control import SessionControl
    from listenerpool.settings import Settings
    from listenerpool.testing.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1
IDLE_TIMEOUT = 60.0  # LP_IDLE_TIMEOUT of the benches' workers
STATE_CHUNK = 2000  # HGETs per pipeline when polling session states
CLAIM_BATCH = 64  # claims in flight
START_TIMEOUT = 30.0  # s for a worker to register or a gateway to answer /readyz


# ============================================================================================
# Child processes
# ============================================================================================
class BenchError(Exception):
    """The run itself broke (as opposed to a target being missed)."""


def _child_setup() -> None:
    """In a child between fork and exec: take the whole fd allowance and die with the bench."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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

    def spawn_server(self, args: Sequence[str], what: str) -> tuple[subprocess.Popen[bytes], int]:
        """A child that prints ``port N`` once it listens: the process and its port."""
        proc = self.spawn(args)
        words = read_line(proc, 30, f"{what} start").split()
        if len(words) != 2 or words[0] != "port":
            raise BenchError(f"{what} start: unexpected {words!r}")
        return proc, int(words[1])

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


# ============================================================================================
# The guard around a run
# ============================================================================================
class Stoppable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Stoppable)


class Rig:
    """What one run holds: its child processes, the servers it started (Redis, a cluster, an
    in-process upstream) and its log directory. Leaving the ``with`` block stops the children
    first (a worker drains while its Redis still answers), then the servers, newest first, then
    removes a temporary log directory."""

    def __init__(self, log_dir: str = "", prefix: str = "lp-bench-") -> None:
        self.children = Children()
        self._servers: list[Stoppable] = []
        self._given = log_dir
        self._prefix = prefix
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self, server: S) -> S:
        """Start ``server`` and stop it when the run ends (also when starting it fails)."""
        self._servers.append(server)
        server.start()
        return server

    def redis(self) -> RedisServer:
        """A private ``redis-server`` on a free port: never the shared one on 6379."""
        from listenerpool.testing.redis_server import RedisServer

        return self.start(RedisServer())

    @property
    def log_dir(self) -> Path:
        """``--log-dir`` when given (created), else a temporary directory removed at the end."""
        if self._given:
            path = Path(self._given)
            path.mkdir(parents=True, exist_ok=True)
            return path
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=self._prefix)
        return Path(self._tmp.name)

    def close(self) -> None:
        try:
            self.children.close()
            for server in reversed(self._servers):
                server.stop()
            self._servers.clear()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench's parser, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)


def raise_fd_limit(needed: int) -> int:
    """Raise this process's limits of open files (soft and hard) to ``needed`` where it may
    (as root with CAP_SYS_RESOURCE, up to fs.nr_open), so that the children it starts inherit
    them; returns the hard limit in force."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return needed if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
    except (ValueError, OSError):
        return hard
    return needed


def check_fd_limit(needed: int, what: str) -> None:
    """A run that would hit the fd hard limit half-way breaks at once instead."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed + 256:
        raise BenchError(f"fd hard limit {hard} is too low for {needed} {what}")


# ============================================================================================
# The machine and the code
# ============================================================================================
def machine_line() -> str:
    model = "unknown cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {model}, Python {sys.version.split()[0]}"


def redis_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


def load_average() -> str:
    """The 1-minute load average: other work on the machine shows in the latencies."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def cpu_seconds(process: int | psutil.Process) -> float:
    """User + system CPU seconds of a process (a pid or a ``psutil.Process``)."""
    import psutil

    if isinstance(process, int):
        process = psutil.Process(process)
    times = process.cpu_times()
    return float(times.user + times.system)


# ============================================================================================
# Workers and gateways
# ============================================================================================
def _pool_env(redis_url: str, **lp: str) -> dict[str, str]:
    """This environment without any ``LP_`` setting of the caller's, plus ``LP_REDIS_URL`` and
    ``lp`` (``LP_`` names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LP_")}
    env.update(LP_REDIS_URL=redis_url, **lp)
    return env


def start_worker(
    children: Children,
    redis_url: str,
    *,
    worker_id: str,
    capacity: int,
    lease_ttl: float,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    wait: bool = True,
) -> subprocess.Popen[bytes]:
    """``python -m workers``, returned once it registered in ``lp:workers``; at once with
    ``wait=False`` (then :func:`wait_worker`, e.g. after starting a gateway beside it)."""
    env = _pool_env(
        redis_url,
        LP_WORKER_CAPACITY=str(capacity),
        LP_LEASE_TTL=str(lease_ttl),
        LP_IDLE_TIMEOUT=str(IDLE_TIMEOUT),
        LP_WORKER_ID=worker_id,
        LP_LOG_LEVEL="INFO",
    )
    env.update(extra_env or {})
    with open(log_path, "wb") as log:
        proc = children.spawn([sys.executable, "-m", "workers"], env=env, log=log)
    if wait:
        wait_worker(proc, redis_url, worker_id, log_path)
    return proc


def wait_worker(
    proc: subprocess.Popen[bytes], redis_url: str, worker_id: str, log_path: Path
) -> None:
    """Until the worker registered in ``lp:workers``."""
    from listenerpool import keys

    sync = plain_client(redis_url)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not sync.exists(keys.worker_key(worker_id)):
            if proc.poll() is not None:
                raise BenchError(f"worker exited with {proc.returncode}: see {log_path}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"worker did not register within {START_TIMEOUT:g}s: see {log_path}"
                )
            time.sleep(0.05)
    finally:
        sync.close()


def start_gateway(
    children: Children,
    redis_url: str,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    wait: bool = True,
) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m gateway`` on a free port and the port, returned once it is ready; at once
    with ``wait=False`` (then :func:`wait_gateway`)."""
    from listenerpool.testing.redis_server import free_port

    port = free_port()
    env = _pool_env(redis_url, LP_HOST="127.0.0.1", LP_PORT=str(port), LP_LOG_LEVEL="WARNING")
    env.update(extra_env or {})
    with open(log_path, "wb") as log:
        proc = children.spawn([sys.executable, "-m", "gateway"], env=env, log=log)
    if wait:
        wait_gateway(proc, port, log_path)
    return proc, port


def wait_gateway(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Until the gateway answers ``/readyz`` with 200."""
    import httpx

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        if proc.poll() is not None:
            raise BenchError(f"gateway exited with {proc.returncode}: see {log_path}")
        if time.monotonic() > deadline:
            raise BenchError(f"gateway not ready within {START_TIMEOUT:g}s: see {log_path}")
        time.sleep(0.05)


# ============================================================================================
# Redis clients, sessions and their states
# ============================================================================================
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


def flush(redis_url: str) -> None:
    """Empty the bench's private Redis between phases."""
    client = plain_client(redis_url)
    try:
        client.flushall()
    finally:
        client.close()


def add_history_options(parser: argparse.ArgumentParser, history_help: str) -> None:
    """``--history`` and ``--payload-bytes``: what :func:`write_history` gives each session."""
    parser.add_argument("--history", type=count_arg, default=0, help=history_help)
    parser.add_argument(
        "--payload-bytes", type=count_arg, default=160, help="data size of those events (160)"
    )


def count_arg(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def rate_arg(text: str) -> float:
    """An argparse type: a finite number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more: {text}")
    return value


def write_history(redis_url: str, sids: Sequence[str], events: int, size: int) -> None:
    """Give each session ``events`` published events of ``size`` bytes of data, as
    ``publish.lua`` writes them (stream entries and the state's ``seq``), before it is
    claimed: a worker adopting it then loads its recent events (``LP_RESTORE_EVENTS``, within
    ``LP_RESTORE_BYTES``) as it does when it takes sessions over."""
    from listenerpool import keys

    data = "x" * size
    client = plain_client(redis_url)
    try:
        for start in range(0, len(sids), 100):
            with client.pipeline(transaction=False) as pipe:
                for sid in sids[start : start + 100]:
                    k = keys.SessionKeys(sid)
                    for seq in range(1, events + 1):
                        pipe.xadd(
                            k.events,
                            {"seq": seq, "epoch": 1, "event": "message", "data": data,
                             "uid": f"{sid}-{seq}"},
                            id=f"{seq}-0",
                        )  # fmt: skip
                    pipe.hset(k.state, "seq", events)
                pipe.execute()
    finally:
        client.close()
    print(f"  {len(sids)} sessions given {events} events of history each", flush=True)


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


async def published_events(redis: Any, state_keys: Sequence[str]) -> int:
    """How many events the sessions have published in all: the sum of their ``seq``."""
    total = 0
    for start in range(0, len(state_keys), STATE_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for key in state_keys[start : start + STATE_CHUNK]:
                pipe.hget(key, "seq")
            total += sum(int(value or 0) for value in await pipe.execute())
    return total


def redis_ms(time_reply: Sequence[Any]) -> int:
    """A Redis ``TIME`` reply (seconds, microseconds) in ms: the clock of the ``since`` field
    Redis writes with each state, which the benches time sessions by."""
    seconds, micros = time_reply
    return int(seconds) * 1000 + int(micros) // 1000


def state_keys_of(sids: Sequence[str]) -> list[str]:
    from listenerpool import keys

    return [keys.SessionKeys(sid).state for sid in sids]


class Sessions:
    """The claim path a gateway takes (:class:`SessionControl` on the pool's Redis), for
    sessions the bench claims, cancels and watches. Close with :meth:`aclose`."""

    def __init__(self, redis_url: str, **settings: Any) -> None:
        from listenerpool.connections import async_redis, listen_queue, sync_redis
        from listenerpool.control import SessionControl
        from listenerpool.settings import load_settings

        self.settings: Settings = load_settings(redis_url=redis_url, **settings)
        self.redis = async_redis(self.settings)
        self._sync = sync_redis(self.settings)
        self.control: SessionControl = SessionControl(
            self.redis, listen_queue(self._sync, self.settings), self.settings
        )

    async def claim(
        self, sids: Sequence[str], url_of: Callable[[str], str], batch: int = CLAIM_BATCH
    ) -> Counter[str]:
        """Claim every session, ``batch`` at a time; the claims' outcomes."""
        outcomes: Counter[str] = Counter()
        for start in range(0, len(sids), batch):
            chunk = sids[start : start + batch]
            results = await asyncio.gather(*(self.control.claim(sid, url_of(sid)) for sid in chunk))
            outcomes.update(r.outcome.value for r in results)
        return outcomes

    async def states(self, sids: Sequence[str]) -> Counter[str]:
        """How many of ``sids`` are in each state."""
        return await count_states(self.redis, state_keys_of(sids))

    async def wait_for(
        self,
        sids: Sequence[str],
        *,
        timeout: float,
        state: str = "listening",
        workers: Sequence[subprocess.Popen[bytes]] = (),
        since: float | None = None,
    ) -> Counter[str]:
        """Until every session reads ``state``; the states then. BenchError ``timeout`` seconds
        after ``since`` (``time.monotonic()``, default now) or when one of ``workers`` exits."""
        state_keys = state_keys_of(sids)
        deadline = (time.monotonic() if since is None else since) + timeout
        while (states := await count_states(self.redis, state_keys))[state] < len(sids):
            if any(w.poll() is not None for w in workers):
                raise BenchError("a worker exited during bring-up")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"only {states[state]}/{len(sids)} {state} after {timeout:g}s: {dict(states)}"
                )
            await asyncio.sleep(0.05)
        return states

    async def aclose(self) -> None:
        await self.redis.aclose()
        self._sync.close()


def claim_and_wait(
    redis_url: str,
    sids: Sequence[str],
    url_of: Callable[[str], str],
    *,
    lease_ttl: float,
    timeout: float,
    workers: Sequence[subprocess.Popen[bytes]] = (),
) -> float:
    """Claim every session through :class:`SessionControl`; return the seconds until all of
    them read ``listening``. Raises BenchError after ``timeout`` or when one of ``workers``
    exits meanwhile."""

    async def bring_up() -> float:
        sessions = Sessions(redis_url, lease_ttl=lease_ttl)
        try:
            started = time.monotonic()
            await sessions.claim(sids, url_of)
            await sessions.wait_for(sids, timeout=timeout, workers=workers, since=started)
            return time.monotonic() - started
        finally:
            await sessions.aclose()

    return asyncio.run(bring_up())


# ============================================================================================
# How a measured worker ended
# ============================================================================================
_LOG_LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")


@dataclass
class WorkerEnd:
    """How a measured worker ended: the seconds SIGTERM took to stop it (it drains first), its
    exit status, and its log: lines by level (tracebacks as ``TRACEBACK``) and warnings and
    errors by message shape."""

    log_path: str = ""
    drain_seconds: float = 0.0
    exit: int | None = None
    levels: Counter[str] = field(default_factory=Counter)
    patterns: Counter[str] = field(default_factory=Counter)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        self.drain_seconds = Children.stop(proc, timeout)
        self.exit = proc.returncode

    def scan(self, variable: re.Pattern[str], shape: Callable[[re.Match[str]], str]) -> None:
        """Read the log; in a warning or error each ``variable`` match becomes ``shape(match)``,
        so that the same message about different sessions counts once."""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            for line in log:
                if line.startswith("Traceback"):
                    self.levels["TRACEBACK"] += 1
                    continue
                match = _LOG_LINE.match(line.rstrip("\n"))
                if match is None:
                    continue
                level, logger, message = match.groups()
                self.levels[level] += 1
                if level not in ("DEBUG", "INFO"):
                    self.patterns[f"{level} {logger}: {variable.sub(shape, message)[:160]}"] += 1

    @property
    def problems(self) -> int:
        """Warning, error and traceback lines."""
        return sum(n for level, n in self.levels.items() if level not in ("INFO", "DEBUG"))

    def stopped(self) -> str:
        return (
            f"in {self.drain_seconds:.1f}s, exit {self.exit}; log {dict(self.levels)} "
            f"({self.log_path})"
        )

    def print_patterns(self) -> None:
        for pattern, count in self.patterns.most_common(8):
            print(f"    {count:>6} x {pattern}")


# ============================================================================================
# Figures
# ============================================================================================
def figure(name: str, value: str, note: str = "info", ok: bool | None = None) -> None:
    """One figure line: ``name: value (note)``, then PASS or FAIL when ``ok`` judges it
    against the target the note names."""
    line = f"{name}: {value} ({note})"
    print(line if ok is None else f"{line} {'PASS' if ok else 'FAIL'}")


def percentile(values: Sequence[float], q: float, empty: float = math.inf) -> float:
    """Nearest-rank percentile (``q`` in 0..100); ``empty`` for no values."""
    if not values:
        return empty
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"
