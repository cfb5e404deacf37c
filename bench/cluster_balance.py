"""Balance over a Redis Cluster: how evenly the pool's sessions, keys, memory, Redis CPU and
commands spread over the primaries.

A local cluster (``listenerpool.testing.harness.redis_cluster``: 3 primaries with a replica each, on
free loopback ports), ``--workers`` (2) ``python -m workers`` on it, and ``--sessions`` (3,000)
sessions claimed through :class:`SessionControl` (the gateway's claim path), with uuid4-hex ids
(``--ids uuid``) or ``user-1``, ``user-2``, ... (``--ids sequential``). The upstream
(``rig_upstreams.py _firehose``, its own process) sends ``--rate`` (1) events/s per session,
one per write, ~160 bytes each; ``--rate 0`` gives idle streams (``rig_upstreams.py
_upstream``, heartbeats only).

Once every session listens, and after ``--warmup`` (3 s), the bench reads each primary's
``INFO`` at the start and end of a ``--seconds`` (10 s) window. Per primary it reports:
sessions (those whose keys hash to its slots), index buckets (``lp:{ix.N}:*``), keys
(``DBSIZE``), used_memory growth since before the first claim, Redis CPU
(``used_cpu_sys + used_cpu_user`` delta) and commands processed (``total_commands_processed``
delta) in the window, and events published (the sessions' ``seq`` deltas). The spread of a
figure is its largest and smallest per-primary value against the mean over primaries. Figures
come last::

    balance_sessions: +2.1% / -1.9% of the mean (target within +-10%) PASS
    balance_index_buckets: +12.5% / -25.0% of the mean (info: 16 buckets over 3 primaries)

Unlike the other benches, a missed target exits 1: this bench checks the key layout, so a miss
is a finding, not noise. A run that breaks exits 1 too, with an ``error:`` line instead of the
figures.

    .venv/bin/python bench/cluster_balance.py                      # 3,000 uuid ids, 1 ev/s each
    .venv/bin/python bench/cluster_balance.py --ids sequential
    .venv/bin/python bench/cluster_balance.py --sessions 3000 --rate 0 --workers 1
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] when this file runs as a script.
import rig
from rig_upstreams import PAYLOAD_BYTES, FirehoseProcess, UpstreamProcess

SESSIONS = 3000
LEASE_TTL = 10.0
TOLERANCE = 0.10


# ============================================================================================
# Pure parts
# ============================================================================================
def session_ids(count: int, kind: str, seed: int) -> list[str]:
    """``count`` distinct session ids: uuid4 hex (reproducible from ``seed``) or ``user-<n>``."""
    if kind == "sequential":
        return [f"user-{n}" for n in range(1, count + 1)]
    rng = random.Random(seed)
    return [uuid.UUID(int=rng.getrandbits(128), version=4).hex for _ in range(count)]


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(max / mean - 1, min / mean - 1); (0, 0) when the mean is 0."""
    mean = sum(values) / len(values) if values else 0.0
    if mean <= 0:
        return 0.0, 0.0
    return max(values) / mean - 1, min(values) / mean - 1


def count_by_owner(slots: Sequence[int], owner_of: Callable[[int], str]) -> dict[str, int]:
    """How many of ``slots`` each owner serves."""
    counts: dict[str, int] = {}
    for slot in slots:
        name = owner_of(slot)
        counts[name] = counts.get(name, 0) + 1
    return counts


# ============================================================================================
# Measuring the primaries
# ============================================================================================
@dataclass
class Primary:
    port: int
    slots: tuple[str, ...]
    sessions: int = 0
    buckets: int = 0
    keys: int = 0
    memory_before: int = 0
    memory_after: int = 0
    cpu: float = 0.0  # Redis CPU seconds in the window
    commands: int = 0  # commands processed in the window
    events: int = 0  # events its sessions published in the window
    calls: dict[str, int] = field(default_factory=dict)  # per command, in the window

    @property
    def memory(self) -> int:
        return self.memory_after - self.memory_before


@dataclass
class Result:
    primaries: list[Primary]
    seconds: float = 0.0
    bringup: float = 0.0
    events: int = 0
    worker_cpu: float = 0.0  # % of one core, all workers
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    extra: dict[str, str] = field(default_factory=dict)


def info_of(cluster: Any, port: int) -> dict[str, Any]:
    with cluster.client(port) as client:
        info: dict[str, Any] = client.info()
        info["dbsize"] = client.dbsize()
        info["calls"] = {
            name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in client.info("commandstats").items()
        }
    return info


def cpu_of(info: Mapping[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def seqs(client: Any, sids: Sequence[str]) -> list[int]:
    """Every session's ``seq`` (events published so far), pipelined."""
    from listenerpool.keys import SessionKeys

    out: list[int] = []
    for start in range(0, len(sids), rig.STATE_CHUNK):
        pipe = client.pipeline(transaction=False)
        for sid in sids[start : start + rig.STATE_CHUNK]:
            pipe.hget(SessionKeys(sid).state, "seq")
        out += [int(v or 0) for v in pipe.execute()]
    return out


def measure(
    cluster: Any, opts: argparse.Namespace, children: rig.Children, log_dir: Path
) -> Result:
    from redis.crc import key_slot

    from listenerpool import keys

    nodes = [n for n in cluster.nodes() if n.role == "primary" and n.slots and not n.failed]
    primaries = {n.port: Primary(n.port, n.slots) for n in sorted(nodes, key=lambda n: n.port)}

    def owner_of(slot: int) -> str:
        return str(next(n.port for n in nodes if n.serves(slot)))

    sids = session_ids(opts.sessions, opts.ids, opts.seed)
    slot_of = {sid: key_slot(keys.SessionKeys(sid).spec.encode()) for sid in sids}
    owner_by_sid = {sid: int(owner_of(slot)) for sid, slot in slot_of.items()}
    for name, n in count_by_owner(list(slot_of.values()), owner_of).items():
        primaries[int(name)].sessions = n
    bucket_slots = [key_slot(keys.lease_index(b).encode()) for b in range(keys.INDEX_BUCKETS)]
    for name, n in count_by_owner(bucket_slots, owner_of).items():
        primaries[int(name)].buckets = n

    result = Result(list(primaries.values()))
    if opts.rate > 0:
        upstream: Any = FirehoseProcess(
            children, rate=opts.rate, chunk=1, payload=opts.payload_bytes
        )
    else:
        upstream = UpstreamProcess(children)
    workers = [
        rig.start_worker(
            children,
            cluster.url,
            worker_id=f"bench-balance-{i}",
            capacity=opts.sessions,
            lease_ttl=LEASE_TTL,
            log_path=log_dir / f"worker-{i}.log",
        )
        for i in range(opts.workers)
    ]
    for p in primaries.values():
        p.memory_before = int(info_of(cluster, p.port)["used_memory"])
    print(f"  claiming {len(sids):,} sessions ({opts.ids} ids)", flush=True)
    result.bringup = rig.claim_and_wait(
        cluster.url, sids, upstream.url, lease_ttl=LEASE_TTL, timeout=opts.bringup_timeout,
        workers=workers,
    )  # fmt: skip
    print(f"  all {len(sids):,} listening after {result.bringup:.1f}s", flush=True)
    time.sleep(opts.warmup)
    client = rig.plain_client(cluster.url)
    try:
        seq0 = seqs(client, sids)
        before = {port: info_of(cluster, port) for port in primaries}
        worker_cpu0 = sum(rig.cpu_seconds(w.pid) for w in workers)
        started = time.monotonic()
        time.sleep(opts.seconds)
        after = {port: info_of(cluster, port) for port in primaries}
        result.seconds = time.monotonic() - started
        result.worker_cpu = (
            100 * (sum(rig.cpu_seconds(w.pid) for w in workers) - worker_cpu0) / result.seconds
        )
        seq1 = seqs(client, sids)
    finally:
        client.close()
    result.load = os.getloadavg()
    for sid, a, b in zip(sids, seq0, seq1, strict=True):
        primaries[owner_by_sid[sid]].events += b - a
        result.events += b - a
    for port, p in primaries.items():
        p.cpu = cpu_of(after[port]) - cpu_of(before[port])
        p.commands = int(after[port]["total_commands_processed"]) - int(
            before[port]["total_commands_processed"]
        )
        p.keys = int(after[port]["dbsize"])
        p.calls = {
            name: n - before[port]["calls"].get(name, 0)
            for name, n in after[port]["calls"].items()
            if n > before[port]["calls"].get(name, 0)
        }
        p.memory_after = int(after[port]["used_memory"])
    still = sorted(n.port for n in cluster.nodes() if n.role == "primary" and not n.failed)
    if still != sorted(primaries):
        raise rig.BenchError(
            f"the primaries changed during the run: {sorted(primaries)} -> {still}"
        )
    if any(w.poll() is not None for w in workers):
        raise rig.BenchError("a worker exited during the window")
    return result


# ============================================================================================
# Report
# ============================================================================================
FIGURES: tuple[tuple[str, str, Callable[[Primary], float], bool], ...] = (
    ("sessions", "sessions by slot", lambda p: p.sessions, True),
    ("keys", "keys (DBSIZE)", lambda p: p.keys, True),
    ("memory", "used_memory growth", lambda p: p.memory, True),
    ("cpu", "Redis CPU in the window", lambda p: p.cpu, True),
    ("commands", "commands processed in the window", lambda p: p.commands, True),
    ("index_buckets", "index buckets", lambda p: p.buckets, False),
)


def print_report(result: Result, opts: argparse.Namespace, machine: str) -> bool:
    """Print the table and the figure lines; True when every target is met."""
    print()
    rate = f"{opts.rate:g} events/s per session" if opts.rate else "idle streams"
    print(
        f"cluster balance: {opts.sessions:,} sessions ({opts.ids} ids), {rate}, "
        f"{opts.workers} worker(s), {len(result.primaries)} primaries -- {machine}"
    )
    print(
        f"  window {result.seconds:.1f}s: {result.events:,} events published "
        f"({result.events / result.seconds:,.0f}/s), workers {result.worker_cpu:.0f}% of a "
        f"core; load average at the end {result.load[0]:.2f} {result.load[1]:.2f} "
        f"{result.load[2]:.2f}"
    )
    header = (
        f"  {'primary':<16} {'slots':<12} {'sessions':>8} {'buckets':>7} {'keys':>7} "
        f"{'mem +MiB':>8} {'CPU ms':>7} {'CPU %':>6} {'commands':>9} {'events':>7} "
        f"{'CPU us/ev':>9}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for p in result.primaries:
        per_event = f"{p.cpu / p.events * 1e6:.1f}" if p.events else "-"
        print(
            f"  127.0.0.1:{p.port:<6} {','.join(p.slots):<12} {p.sessions:>8,} {p.buckets:>7} "
            f"{p.keys:>7,} {p.memory / 1048576:>8.2f} {p.cpu * 1000:>7.0f} "
            f"{100 * p.cpu / result.seconds:>6.1f} {p.commands:>9,} {p.events:>7,} "
            f"{per_event:>9}"
        )
    print("  commands in the window by name (INFO commandstats; a script's own commands count):")
    for p in result.primaries:
        top = sorted(p.calls.items(), key=lambda item: -item[1])[:8]
        print(f"    {p.port}: " + ", ".join(f"{name} {n:,}" for name, n in top))
    print()
    ok = True
    for name, what, value_of, judged in FIGURES:
        values = [float(value_of(p)) for p in result.primaries]
        high, low = spread(values)
        shown = " / ".join(f"{v:,.0f}" if v >= 100 else f"{v:,.3g}" for v in values)
        value = f"{high:+.1%} / {low:+.1%} of the mean"
        if judged:
            met = high <= opts.tolerance and low >= -opts.tolerance
            ok = ok and met
            target = f"{what}: {shown}; target within +-{opts.tolerance:.0%}"
            rig.figure(f"balance_{name}", value, target, met)
        else:
            buckets = sum(p.buckets for p in result.primaries)
            note = (
                f"{what}: {shown}; info: {buckets} buckets over {len(result.primaries)} primaries"
            )
            rig.figure(f"balance_{name}", value, note)
    rig.figure("bringup_seconds", f"{result.bringup:.1f}")
    rig.figure("events_per_s", f"{result.events / result.seconds:,.0f}")
    if result.events:
        worker_us = result.worker_cpu / 100 * result.seconds / result.events * 1e6
        redis_us = sum(p.cpu for p in result.primaries) / result.events * 1e6
        rig.figure("worker_cpu_per_event", f"{worker_us:.0f} us", "info; renewals included")
        rig.figure(
            "redis_cpu_per_event",
            f"{redis_us:.1f} us",
            "info; all primaries, renewals included",
        )
    return ok


# ============================================================================================
# Main
# ============================================================================================
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="sessions (3000)")
    parser.add_argument(
        "--ids",
        choices=("uuid", "sequential"),
        default="uuid",
        help="session ids: uuid4 hex, or user-1, user-2, ... (uuid)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the uuid ids (1)")
    parser.add_argument(
        "--rate", type=float, default=1.0, help="events/s per session, 0 = idle streams (1)"
    )
    parser.add_argument("--payload-bytes", type=int, default=PAYLOAD_BYTES, help="(160)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window (10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="s before the window (3)")
    parser.add_argument(
        "--bringup-timeout", type=float, default=180.0, help="max s until all listen (180)"
    )
    parser.add_argument(
        "--node-timeout",
        type=int,
        default=5000,
        help="cluster-node-timeout ms; high so a loaded machine does not fail nodes over (5000)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help="allowed spread vs the mean (0.10)"
    )
    parser.add_argument("--log-dir", default="", help="keep the worker logs here")
    opts = parser.parse_args(argv)
    if opts.sessions < 1 or opts.workers < 1:
        parser.error("--sessions and --workers must be positive")
    return opts


def run(opts: argparse.Namespace) -> int:
    from listenerpool.testing.harness.redis_cluster import RedisClusterNodes

    machine = rig.machine_line()
    load = os.getloadavg()
    print(
        f"cluster balance bench: {machine}; load average at the start {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    with rig.Rig(opts.log_dir, "lp-density-") as bench:
        cluster = bench.start(
            RedisClusterNodes(primaries=3, replicas=1, node_timeout_ms=opts.node_timeout)
        )
        with cluster.client(cluster.primary_ports()[0]) as c:
            machine += f", Redis {c.info('server').get('redis_version', '?')}"
        print(f"  cluster {cluster.url}", flush=True)
        result = measure(cluster, opts, bench.children, bench.log_dir)
        ok = print_report(result, opts, machine)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    return rig.run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
