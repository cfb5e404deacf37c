"""The same workload through two naive designs users build today, against the pool.

**(a) a reader per session in every gateway replica** (the in-process design the pool replaces),
scaled out to ``--replicas`` (3) replicas behind round-robin. A naive replica (``_naive``: a
Starlette app under uvicorn, like a typical backend) starts an httpx streaming reader for a
session on ``PUT /v1/sessions/{sid}`` and, as such backends do to make a subscription work,
also when a WebSocket subscribes to a session it has no reader for; its clients get what its
own reader reads. The upstream (``_upstream``) is a runner that emits each session's events
once, each to one of the session's open connections (round-robin between them): the way a
runner's event queue is shared by listeners. Per session: the PUT lands on replica ``i``, its
``--clients`` (3) WebSocket clients on the next replicas, as round-robin does. The bench counts
upstream connections per session (1 is right) and the share of the session's events each
client saw (100 % is right). The pool runs the same workload with ``--replicas`` gateways and
one worker.

**(b) one rq job per listener, rq's default forking worker.** An rq worker runs one job at a
time in a forked work horse, so N listeners need N ``rq worker`` processes. The bench starts
``--rq-listeners`` (20) of them, enqueues one job per listener (an httpx streaming read of an
idle upstream stream for ``--hold`` s) and measures the memory (PSS, summed over workers and
horses) and the time from enqueue to the upstream seeing the connection. The pool runs the
same listeners in one worker, from claim to the upstream seeing the connection. Figures last::

    naive_a_upstream_conns_per_session: 2.0 (pool 1.0) ...
    naive_b_memory_ratio: 95x (rq PSS per listener / pool) (info)

    .venv/bin/python bench/compare_naive.py
    .venv/bin/python bench/compare_naive.py --sessions 100 --rq-listeners 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# bench/ is sys.path[0] when this file runs as a script (and on an rq worker's PYTHONPATH).
import rig
from rig_upstreams import SSE_HEAD, read_head

HERE = Path(__file__).resolve().parent
SESSIONS = 30
REPLICAS = 3
CLIENTS = 3
EVENTS = 50
RATE = 10.0  # events/s per session
RQ_LISTENERS = 20
HOLD = 5.0
LEASE_TTL = 10.0
# As ramp.py's gateway: the bench measures the designs, not the API's throttling.
GATEWAY_ENV = {"LP_LEASE_TTL": str(LEASE_TTL), "LP_API_RATE": "0"}


# ============================================================================================
# The upstream: a runner whose listeners share each session's events
# ============================================================================================
class Runner:
    def __init__(self, events: int, rate: float) -> None:
        self.events = events
        self.rate = rate
        self.conns: dict[str, list[asyncio.StreamWriter]] = {}
        self.opened: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}
        self.emitted: Counter[str] = Counter()
        self.heartbeats: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader, writer)
        if head is None:
            return
        sid = head.split(b" ", 2)[1].decode().rsplit("/", 1)[-1]
        self.opened[sid] += 1
        self.first_seen.setdefault(sid, time.time())
        writer.write(SSE_HEAD + b": hello\n\n")
        group = self.conns.setdefault(sid, [])
        group.append(writer)
        try:
            while await reader.read(4096):
                pass
        except OSError:
            pass
        finally:
            group.remove(writer)
            writer.close()

    async def emit(self) -> None:
        """Every session's events 1..N at ``rate``/s, each to one of its open connections."""
        period = 1.0 / self.rate
        for n in range(1, self.events + 1):
            for sid, group in self.conns.items():
                if not group:
                    continue
                writer = group[n % len(group)]
                data = json.dumps({"n": n, "sid": sid})
                writer.write(f"id: {n}\nevent: CUSTOM\ndata: {data}\n\n".encode())
                self.emitted[sid] += 1
            await asyncio.sleep(period)

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(5)
            for group in self.conns.values():
                for writer in group:
                    writer.write(b": heartbeat\n\n")


def upstream_child(events: int, rate: float) -> int:
    return asyncio.run(_upstream(events, rate))


async def _upstream(events: int, rate: float) -> int:
    runner = Runner(events, rate)
    server = await asyncio.start_server(runner.serve, "127.0.0.1", 0, backlog=4096)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    loop = asyncio.get_running_loop()
    beat = asyncio.create_task(runner.heartbeat())
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "emit":
            await runner.emit()
            print("emitted", flush=True)
        elif line == "stats":
            print(
                json.dumps(
                    {"opened": runner.opened, "first_seen": runner.first_seen,
                     "emitted": runner.emitted}
                ),
                flush=True,
            )  # fmt: skip
        else:
            break
    beat.cancel()
    server.close()
    os._exit(0)


class RunnerProcess:
    def __init__(self, children: rig.Children, events: int, rate: float) -> None:
        self.proc, self.port = children.spawn_server(
            [sys.executable, __file__, "_upstream", "--events", str(events), "--rate", str(rate)],
            "upstream",
        )

    def url(self, sid: str) -> str:
        return f"http://127.0.0.1:{self.port}/events/{sid}"

    def emit(self, timeout: float) -> None:
        rig.send_line(self.proc, "emit")
        if rig.read_line(self.proc, timeout, "upstream emit") != "emitted":
            raise rig.BenchError("upstream: unexpected answer to emit")

    def stats(self) -> dict[str, dict[str, float]]:
        rig.send_line(self.proc, "stats")
        stats: dict[str, dict[str, float]] = json.loads(
            rig.read_line(self.proc, 30, "upstream stats")
        )
        return stats


# ============================================================================================
# (a) the naive replica
# ============================================================================================
def naive_child(port: int) -> int:
    """A backend replica with an in-process reader per session (what the pool replaces)."""
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    readers: dict[str, asyncio.Task[None]] = {}
    followers: dict[str, set[asyncio.Queue[str]]] = {}
    urls: dict[str, str] = {}
    http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=60.0))

    async def read(sid: str, url: str) -> None:
        async with http.stream("GET", url, headers={"Accept": "text/event-stream"}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    for queue in followers.get(sid, ()):
                        queue.put_nowait(line[6:])

    def ensure_reader(sid: str, url: str) -> None:
        if sid not in readers or readers[sid].done():
            readers[sid] = asyncio.create_task(read(sid, url))

    async def put(request: Request) -> JSONResponse:
        sid = request.path_params["sid"]
        urls[sid] = (await request.json())["url"]
        ensure_reader(sid, urls[sid])
        return JSONResponse({"sid": sid}, status_code=201)

    async def events(websocket: WebSocket) -> None:
        sid = websocket.path_params["sid"]
        await websocket.accept()
        # The subscription landed here: start a reader if this replica has none. The runner URL
        # is known by convention (the backend derives it from the session id).
        ensure_reader(sid, websocket.query_params["url"])
        queue: asyncio.Queue[str] = asyncio.Queue()
        followers.setdefault(sid, set()).add(queue)
        try:
            while True:
                await websocket.send_text(await queue.get())
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            followers[sid].discard(queue)

    app = Starlette(
        routes=[
            Route("/v1/sessions/{sid}", put, methods=["PUT"]),
            WebSocketRoute("/v1/sessions/{sid}/events", events),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio")
    return 0


@dataclass
class SplitResult:
    name: str
    conns_per_session: list[int] = field(default_factory=list)
    seen_share: list[float] = field(default_factory=list)  # per client, events seen / emitted
    clients: int = 0

    @property
    def mean_conns(self) -> float:
        return sum(self.conns_per_session) / max(len(self.conns_per_session), 1)

    @property
    def complete_clients(self) -> int:
        return sum(1 for share in self.seen_share if share >= 1.0)


async def drive_split(
    ports: Sequence[int], runner: RunnerProcess, opts: argparse.Namespace, pool_url: str
) -> dict[str, int]:
    """PUT each session on replica i % R (naive replicas; the pool's gateways take a claim the
    same way), connect the clients round-robin on the following replicas, let the runner emit,
    and return the events each client saw (key ``sid/client``)."""
    from websockets.asyncio.client import connect

    sids = [f"split-{i}" for i in range(opts.sessions)]
    if not pool_url:
        for i, sid in enumerate(sids):
            await _put(ports[i % len(ports)], sid, runner.url(sid))
    seen: Counter[str] = Counter()
    conns = []
    for i, sid in enumerate(sids):
        for c in range(opts.clients):
            port = ports[(i + 1 + c) % len(ports)]
            url = f"ws://127.0.0.1:{port}/v1/sessions/{sid}/events?url={runner.url(sid)}"
            conns.append((f"{sid}/{c}", await connect(url, open_timeout=30, ping_interval=None)))
    await asyncio.sleep(1.0)  # every reader connected
    readers = [asyncio.create_task(_count(ws, key, seen)) for key, ws in conns]
    await asyncio.to_thread(runner.emit, opts.events / opts.rate + 60)
    await asyncio.sleep(1.0)  # the last events in flight
    for task in readers:
        task.cancel()
    for _, ws in conns:
        await ws.close()
    return {key: seen[key] for key, _ in conns}


async def _put(port: int, sid: str, url: str) -> None:
    import httpx

    async with httpx.AsyncClient() as http:
        reply = await http.put(f"http://127.0.0.1:{port}/v1/sessions/{sid}", json={"url": url})
        if reply.status_code not in (200, 201):
            raise rig.BenchError(f"PUT {sid}: HTTP {reply.status_code}")


async def _count(ws: object, key: str, seen: Counter[str]) -> None:
    with contextlib.suppress(Exception):
        async for message in ws:  # type: ignore[attr-defined]
            if '"n"' in message or '\\"n\\"' in message:
                seen[key] += 1


def split_result(name: str, seen: dict[str, int], runner: RunnerProcess) -> SplitResult:
    stats = runner.stats()
    result = SplitResult(name, clients=len(seen))
    sids = sorted({key.split("/")[0] for key in seen})
    result.conns_per_session = [int(stats["opened"].get(sid, 0)) for sid in sids]
    for key, n in seen.items():
        emitted = stats["emitted"].get(key.split("/")[0], 0)
        result.seen_share.append(n / emitted if emitted else 0.0)
    return result


def run_split_naive(children: rig.Children, opts: argparse.Namespace) -> SplitResult:
    from listenerpool.testing.redis_server import free_port

    runner = RunnerProcess(children, opts.events, opts.rate)
    ports = [free_port() for _ in range(opts.replicas)]
    procs = [children.spawn([sys.executable, __file__, "_naive", "--port", str(p)]) for p in ports]
    try:
        for port in ports:
            _wait_port(port)
        seen = asyncio.run(drive_split(ports, runner, opts, ""))
        return split_result("naive", seen, runner)
    finally:
        for proc in procs:
            rig.Children.stop(proc)
        rig.Children.stop(runner.proc)


def run_split_pool(
    children: rig.Children, redis_url: str, opts: argparse.Namespace, log_dir: Path
) -> SplitResult:
    runner = RunnerProcess(children, opts.events, opts.rate)
    procs = [runner.proc]
    try:
        worker = rig.start_worker(
            children, redis_url, worker_id="bench-naive-a", capacity=opts.sessions + 64,
            lease_ttl=LEASE_TTL, log_path=log_dir / "worker-a.log",
        )  # fmt: skip
        procs.append(worker)
        ports = []
        for r in range(opts.replicas):
            gateway, port = rig.start_gateway(
                children, redis_url, log_dir / f"gateway-{r}.log", GATEWAY_ENV
            )
            procs.append(gateway)
            ports.append(port)
        sids = [f"split-{i}" for i in range(opts.sessions)]
        for i, sid in enumerate(sids):  # each PUT through replica i % R, as round-robin does
            asyncio.run(_put(ports[i % len(ports)], sid, runner.url(sid)))
        asyncio.run(_wait_listening(redis_url, sids))
        seen = asyncio.run(drive_split(ports, runner, opts, redis_url))
        return split_result("pool", seen, runner)
    finally:
        for proc in reversed(procs):
            rig.Children.stop(proc, timeout=10)


async def _wait_listening(redis_url: str, sids: Sequence[str]) -> None:
    sessions = rig.Sessions(redis_url)
    try:
        await sessions.wait_for(sids, timeout=60)
    finally:
        await sessions.aclose()


def _wait_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise rig.BenchError(f"naive replica on {port} did not start")
        time.sleep(0.05)


# ============================================================================================
# (b) one rq job per listener
# ============================================================================================
def naive_listen(url: str, seconds: float) -> int:
    """The rq job: hold one upstream stream for ``seconds`` (bounded, so horses end)."""
    import httpx

    lines = 0
    deadline = time.monotonic() + seconds
    with httpx.stream("GET", url, headers={"Accept": "text/event-stream"}, timeout=30) as reply:
        for _ in reply.iter_lines():
            lines += 1
            if time.monotonic() > deadline:
                break
    return lines


@dataclass
class ListenerCost:
    name: str
    listeners: int
    pss: int = 0  # bytes, summed over every process of the design while all listen
    processes: int = 0
    start_latencies: list[float] = field(default_factory=list)  # s, enqueue/claim -> connected

    @property
    def per_listener(self) -> float:
        return self.pss / max(self.listeners, 1)


def _pss(pids: Sequence[int]) -> tuple[int, int]:
    """(summed PSS of ``pids`` and all their descendants, number of processes)."""
    import psutil

    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            seen[pid] = proc
            for child in proc.children(recursive=True):
                seen[child.pid] = child
    total = 0
    for proc in seen.values():
        with contextlib.suppress(psutil.Error):
            total += int(proc.memory_full_info().pss)
    return total, len(seen)


def run_rq(
    children: rig.Children, redis_url: str, opts: argparse.Namespace, log_dir: Path
) -> ListenerCost:
    import redis
    from rq import Queue, Worker

    cost = ListenerCost("rq", opts.rq_listeners)
    runner = RunnerProcess(children, 0, 1.0)
    sync = redis.Redis.from_url(redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LP_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    rq_bin = str(Path(sys.executable).with_name("rq"))
    workers = []
    try:
        sync.flushall()
        for i in range(opts.rq_listeners):
            with open(log_dir / f"rq-{i}.log", "wb") as log:
                workers.append(
                    children.spawn(
                        [rq_bin, "worker", "--url", redis_url, "--name", f"naive-{i}",
                         "naive-listen"],
                        env=env,
                        log=log,
                    )
                )  # fmt: skip
        deadline = time.monotonic() + 60
        # Through rq: its keys carry the pool's prefix ({rq}:workers), which the rq workers
        # inherit through RQ_KEY_PREFIX in the environment.
        while Worker.count(connection=sync) < opts.rq_listeners:
            if time.monotonic() > deadline:
                raise rig.BenchError(f"rq workers did not register: see {log_dir}")
            time.sleep(0.1)
        queue = Queue("naive-listen", connection=sync)
        enqueued: dict[str, float] = {}
        for i in range(opts.rq_listeners):
            sid = f"rq-{i}"
            enqueued[sid] = time.time()
            queue.enqueue(
                "compare_naive.naive_listen", runner.url(sid), opts.hold,
                job_timeout=opts.hold + 60, result_ttl=0,
            )  # fmt: skip
        cost.start_latencies = _wait_connected(runner, enqueued, 60)
        time.sleep(1.0)
        cost.pss, cost.processes = _pss([w.pid for w in workers])
    finally:
        for proc in workers:
            rig.Children.stop(proc, timeout=opts.hold + 10)
        rig.Children.stop(runner.proc)
        sync.close()
    return cost


def run_pool_listeners(
    children: rig.Children, redis_url: str, opts: argparse.Namespace, log_dir: Path
) -> ListenerCost:
    cost = ListenerCost("pool", opts.rq_listeners)
    runner = RunnerProcess(children, 0, 1.0)
    worker = None
    try:
        rig.flush(redis_url)
        worker = rig.start_worker(
            children, redis_url, worker_id="bench-naive-b", capacity=opts.rq_listeners + 64,
            lease_ttl=LEASE_TTL, log_path=log_dir / "worker-b.log",
        )  # fmt: skip
        sids = [f"pl-{i}" for i in range(opts.rq_listeners)]
        enqueued = {sid: time.time() for sid in sids}
        rig.claim_and_wait(redis_url, sids, runner.url, lease_ttl=LEASE_TTL, timeout=60)
        cost.start_latencies = _wait_connected(runner, enqueued, 60)
        time.sleep(1.0)
        cost.pss, cost.processes = _pss([worker.pid])
    finally:
        if worker is not None:
            rig.Children.stop(worker, timeout=10)
        rig.Children.stop(runner.proc)
    return cost


def _wait_connected(
    runner: RunnerProcess, started: dict[str, float], timeout: float
) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        first = runner.stats()["first_seen"]
        if all(sid in first for sid in started):
            return [first[sid] - t for sid, t in started.items()]
        if time.monotonic() > deadline:
            missing = sum(1 for sid in started if sid not in first)
            raise rig.BenchError(f"{missing} listeners never connected within {timeout:g}s")
        time.sleep(0.05)


# ============================================================================================
# Report and main
# ============================================================================================
def print_report(
    split: Sequence[SplitResult], costs: Sequence[ListenerCost], opts: argparse.Namespace,
    machine: str,
) -> None:  # fmt: skip
    print()
    print(f"compare_naive -- {machine}")
    print(
        f"(a) {opts.sessions} sessions x {opts.clients} clients over {opts.replicas} replicas "
        f"(round-robin), {opts.events} events per session"
    )
    for r in split:
        shares = sorted(r.seen_share)
        print(
            f"  {r.name:<6} upstream connections per session: mean {r.mean_conns:.2f}, max "
            f"{max(r.conns_per_session, default=0)}; clients that saw every event: "
            f"{r.complete_clients}/{r.clients}; share seen p50 {rig.percentile(shares, 50):.0%}, "
            f"min {min(shares, default=0):.0%}"
        )
    print(f"(b) {opts.rq_listeners} listeners, idle streams")
    for c in costs:
        print(
            f"  {c.name:<6} PSS {c.pss / 1048576:.1f} MiB in {c.processes} processes = "
            f"{c.per_listener / 1024:.0f} KB per listener; start p50 "
            f"{rig.percentile(c.start_latencies, 50) * 1000:.0f} ms, max "
            f"{rig.percentile(c.start_latencies, 100) * 1000:.0f} ms"
        )
    print()
    by = {r.name: r for r in split}
    naive, pool = by["naive"], by["pool"]
    rig.figure(
        "naive_a_upstream_conns_per_session",
        f"{naive.mean_conns:.2f} (pool {pool.mean_conns:.2f}; "
        f"{naive.mean_conns / max(pool.mean_conns, 1e-9):.1f}x the upstream connections)",
    )
    rig.figure(
        "naive_a_complete_clients",
        f"{naive.complete_clients}/{naive.clients} saw every event "
        f"(pool {pool.complete_clients}/{pool.clients})",
    )
    rig.figure(
        "naive_a_events_seen_p50",
        f"{rig.percentile(naive.seen_share, 50):.0%} per client "
        f"(pool {rig.percentile(pool.seen_share, 50):.0%})",
    )
    cost = {c.name: c for c in costs}
    rq_cost, pool_cost = cost["rq"], cost["pool"]
    rig.figure(
        "naive_b_memory_per_listener",
        f"{rq_cost.per_listener / 1024:.0f} KB (pool {pool_cost.per_listener / 1024:.0f} KB at "
        f"{opts.rq_listeners} listeners incl. the worker's base; rq / pool = "
        f"{rq_cost.per_listener / max(pool_cost.per_listener, 1):.0f}x)",
    )
    rq_p50 = rig.percentile(rq_cost.start_latencies, 50)
    pool_p50 = rig.percentile(pool_cost.start_latencies, 50)
    rig.figure(
        "naive_b_start_p50",
        f"{rq_p50 * 1000:.0f} ms (pool {pool_p50 * 1000:.0f} ms; rq / pool = "
        f"{rq_p50 / max(pool_p50, 1e-9):.1f}x)",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    sub = parser.add_subparsers(dest="child")
    up = sub.add_parser("_upstream")
    up.add_argument("--events", type=int, required=True)
    up.add_argument("--rate", type=float, required=True)
    nv = sub.add_parser("_naive")
    nv.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="(a) sessions (30)")
    parser.add_argument("--replicas", type=int, default=REPLICAS, help="(a) replicas (3)")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="(a) clients/session (3)")
    parser.add_argument("--events", type=int, default=EVENTS, help="(a) events/session (50)")
    parser.add_argument("--rate", type=float, default=RATE, help="(a) events/s/session (10)")
    parser.add_argument("--rq-listeners", type=int, default=RQ_LISTENERS, help="(b) (20)")
    parser.add_argument("--hold", type=float, default=HOLD, help="(b) s each rq job holds (5)")
    parser.add_argument("--log-dir", default="", help="keep logs here")
    return parser.parse_args(argv)


def run(opts: argparse.Namespace) -> int:
    with rig.Rig(opts.log_dir, "lp-nv-") as bench:
        server = bench.redis()
        machine = rig.machine_line()
        print(f"compare_naive bench: {machine}", flush=True)
        children, log_dir = bench.children, bench.log_dir
        print("(a) naive replicas", flush=True)
        naive = run_split_naive(children, opts)
        print("(a) pool", flush=True)
        pool = run_split_pool(children, server.url, opts, log_dir)
        print("(b) rq forking workers", flush=True)
        rq_cost = run_rq(children, server.url, opts, log_dir)
        print("(b) pool", flush=True)
        pool_cost = run_pool_listeners(children, server.url, opts, log_dir)
        print_report([naive, pool], [rq_cost, pool_cost], opts, machine)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child == "_upstream":
        return upstream_child(opts.events, opts.rate)
    if opts.child == "_naive":
        return naive_child(opts.port)
    return rig.run_guarded(run, opts)


if __name__ == "__main__":
    sys.exit(main())
