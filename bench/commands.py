"""Redis commands per published event, counted by Redis itself (``MONITOR``).

A private ``redis-server``, the upstream (``rig_upstreams.py _firehose``) and one
``python -m workers`` holding ``--sessions`` (100) sessions, in two phases with a fresh worker
each:

- **burst**: every stream writes ``--chunk`` events per write as fast as the worker reads;
- **trickle**: ``--trickle-rate`` events/s per session (1), one event per write.

Once all sessions listen, ``redis-cli MONITOR`` records every command for ``--seconds``. Lines
from ``[... lua]`` are the commands a script ran inside Redis (no round trip); the others came
from clients. Events = the ``XADD`` lines; publish calls = client ``EVALSHA`` of
``publish.lua``'s SHA-1. Figures last::

    publish_calls_per_event_burst: 0.004 (target <= 1 round trip, batched when bursty) PASS

    .venv/bin/python bench/commands.py
    .venv/bin/python bench/commands.py --sessions 1000 --seconds 10
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] when this file runs as a script.
import rig
from rig_upstreams import FirehoseProcess

SESSIONS = 100
SECONDS = 5.0
LEASE_TTL = 10.0
_LINE = re.compile(r'^\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]*)"(?: "([^"]*)")?')


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    events: int = 0
    publish_calls: int = 0
    client: Counter[str] = field(default_factory=Counter)  # client commands by name
    lua: Counter[str] = field(default_factory=Counter)

    @property
    def calls_per_event(self) -> float:
        return self.publish_calls / self.events if self.events else float("inf")

    @property
    def client_per_event(self) -> float:
        return sum(self.client.values()) / self.events if self.events else float("inf")


def publish_sha() -> str:
    from listenerpool.scripts import source

    return hashlib.sha1(source("publish").encode()).hexdigest()


def count_monitor(path: Path, phase: Phase, sha: str) -> None:
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            match = _LINE.match(line)
            if match is None:
                continue
            who, command, first = match[1], match[2].lower(), match[3] or ""
            if who == "lua":
                phase.lua[command] += 1
                if command == "xadd":
                    phase.events += 1
            else:
                phase.client[command] += 1
                if command == "evalsha" and first == sha:
                    phase.publish_calls += 1


def run_phase(
    name: str, children: rig.Children, server: Any, opts: argparse.Namespace, log_dir: Path
) -> Phase:
    url, port = server.url, server.port
    phase = Phase(name)
    rig.flush(url)
    rate = 0.0 if name == "burst" else opts.trickle_rate
    upstream = FirehoseProcess(children, rate=rate, chunk=opts.chunk if not rate else 1)
    worker = rig.start_worker(
        children, url, worker_id=f"bench-cmd-{name}", capacity=opts.sessions,
        lease_ttl=LEASE_TTL, log_path=log_dir / f"worker-{name}.log",
    )  # fmt: skip
    sids = [f"cmd-{name}-{i}" for i in range(opts.sessions)]
    monitor: subprocess.Popen[bytes] | None = None
    try:
        rig.claim_and_wait(
            url, sids, upstream.url, lease_ttl=LEASE_TTL, timeout=60, workers=[worker]
        )
        time.sleep(1.0)
        out = log_dir / f"monitor-{name}.txt"
        with open(out, "wb") as sink:
            monitor = children.spawn(["redis-cli", "-p", str(port), "monitor"], log=sink)
            started = time.monotonic()
            time.sleep(opts.seconds)
            rig.Children.stop(monitor)
            phase.seconds = time.monotonic() - started
        if worker.poll() is not None:
            raise rig.BenchError(f"worker exited with {worker.returncode}")
        count_monitor(out, phase, publish_sha())
    finally:
        if monitor is not None:
            rig.Children.stop(monitor)
        rig.Children.stop(worker, timeout=10)
        rig.Children.stop(upstream.proc)
    return phase


def print_report(phases: Sequence[Phase], opts: argparse.Namespace, machine: str) -> None:
    print()
    print(f"commands: {opts.sessions} sessions, counted by MONITOR -- {machine}")
    for p in phases:
        rate = p.events / p.seconds if p.seconds else 0.0
        top = ", ".join(f"{name} {n}" for name, n in p.client.most_common(8))
        print(
            f"  {p.name:<8} {p.events:,} events ({rate:,.0f}/s) in {p.seconds:.1f}s; "
            f"{p.publish_calls:,} publish calls; client commands: {top}"
        )
        lua = ", ".join(f"{name} {n}" for name, n in p.lua.most_common(8))
        print(f"  {'':<8} inside scripts: {lua}")
    print()
    for p in phases:
        ok = p.calls_per_event <= 1.0 and (p.name != "burst" or p.calls_per_event < 0.5)
        rig.figure(
            f"publish_calls_per_event_{p.name}",
            f"{p.calls_per_event:.3f}",
            f"{p.publish_calls:,} calls / {p.events:,} events; target <= 1 round trip, batched "
            "when bursty",
            ok,
        )
        rig.figure(
            f"client_commands_per_event_{p.name}",
            f"{p.client_per_event:.3f}",
            "info; every client command, renewals, heartbeats and job polls included",
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="(100)")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="MONITOR window (5)")
    parser.add_argument("--chunk", type=int, default=16, help="burst: events per write (16)")
    parser.add_argument("--trickle-rate", type=float, default=1.0, help="events/s/session (1)")
    parser.add_argument("--log-dir", default="", help="keep worker logs and MONITOR output here")
    return parser.parse_args(argv)


def run(opts: argparse.Namespace) -> int:
    phases: list[Phase] = []
    with rig.Rig(opts.log_dir, "lp-cmd-") as bench:
        server = bench.redis()
        machine = f"{rig.machine_line()}, Redis {rig.redis_version(server.url)}"
        print(f"commands bench: {machine}", flush=True)
        for name in ("burst", "trickle"):
            phase = run_phase(name, bench.children, server, opts, bench.log_dir)
            print(f"  {name}: {phase.events:,} events, {phase.publish_calls:,} calls", flush=True)
            phases.append(phase)
        print_report(phases, opts, machine)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return rig.run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
