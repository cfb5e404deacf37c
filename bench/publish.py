"""Publish throughput of one worker process: events/s through the publish-if-owner script.

**Ours**: one ``python -m workers`` holding ``--sessions`` (100) busy sessions. The upstream
(``rig.py _firehose``, its own process) writes ``--chunk`` events of ~160 bytes per write to
every stream as fast as the socket drains. Over ``--seconds`` the bench sums every session's
``seq`` (events published) and takes the worker's CPU time.

**Baseline**, in the same run against the same private ``redis-server``: one process (no
upstream, no parsing) running a pipelined redis-py loop of the same ``publish.lua`` script, one
event per call, one call per session per pipeline, with the same envelopes. Ratio = ours /
baseline events/s (target >= 0.30). ``INFO commandstats`` deltas give the script calls per event
on both paths (the worker publishes a burst read in one chunk with one call). The worker's CPU
time over the events it published is its CPU per event (target <= 60 us, ``--target-cpu-us``),
beside the baseline loop's own. Figures last::

    worker_cpu_per_event: 21.0 us (target <= 60 us; 0.8x the pipelined loop's 25.0 us) PASS
    publish_ratio: 0.52 (target >= 0.30 of baseline events/s) PASS

    .venv/bin/python bench/publish.py                      # 100 sessions, 10 s windows
    .venv/bin/python bench/publish.py --sessions 1000 --rate 1 --chunk 1 --seconds 15
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# bench/ is sys.path[0] when this file runs as a script.
import rig
from rig_upstreams import PAYLOAD_BYTES, FirehoseProcess

SESSIONS = 100
SECONDS = 10.0
TARGET_RATIO = 0.30
TARGET_CPU_US = 60.0  # worker CPU per published event
LEASE_TTL = 10.0


# ============================================================================================
# Baseline child
# ============================================================================================
def baseline_child(redis_url: str, sessions: int, payload_bytes: int) -> int:
    """Prepare ``sessions`` owned sessions, print ``ready``; on ``go SECONDS`` run the loop and
    print ``done EVENTS SECONDS CPU``."""
    import resource

    import redis

    from listenerpool.envelope import envelope_parts
    from listenerpool.keys import SessionKeys
    from listenerpool.scripts import source

    client = redis.Redis.from_url(redis_url)
    publish = client.register_script(source("publish"))
    sids = [f"base-{i}" for i in range(sessions)]
    keyset = []
    for sid in sids:
        k = SessionKeys(sid)
        client.set(k.lease, "base:tok")
        client.hset(k.spec, "epoch", 1)
        keyset.append([k.lease, k.spec, k.state, k.events, k.live])
    client.script_load(publish.script)
    pad = "x" * max(payload_bytes - 40, 0)
    print("ready", flush=True)
    words = sys.stdin.readline().split()
    if not words or words[0] != "go":
        return 1
    seconds = float(words[1])
    n = 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    started = time.monotonic()
    end = started + seconds
    while time.monotonic() < end:
        pipe = client.pipeline(transaction=False)
        for ks in keyset:
            n += 1
            data = f'{{"t": {time.time_ns()}, "n": {n}, "pad": "{pad}"}}'
            head, tail = envelope_parts(1, "TEXT_MESSAGE_CONTENT", data, str(n))
            args = ["base:tok", 1, 10000, 86_400_000, str(n)]
            args += ["TEXT_MESSAGE_CONTENT", data, str(n), head, tail]
            publish(keys=ks, args=args, client=pipe)
        pipe.execute()
    elapsed = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"done {n} {elapsed} {usage.ru_utime + usage.ru_stime - cpu0}", flush=True)
    return 0


# ============================================================================================
# The bench
# ============================================================================================
@dataclass
class Side:
    events: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core
    calls: int = 0  # publish script calls (EVALSHA) in the window
    xadds: int = 0

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def commandstats(client: object) -> dict[str, int]:
    info = client.info("commandstats")  # type: ignore[attr-defined]
    return {name: int(stats["calls"]) for name, stats in info.items()}


def run_baseline(children: rig.Children, url: str, opts: argparse.Namespace) -> Side:
    import redis

    side = Side()
    proc = children.spawn(
        [sys.executable, __file__, "_baseline", "--redis-url", url, "--sessions",
         str(opts.sessions), "--payload-bytes", str(opts.payload_bytes)]
    )  # fmt: skip
    client = redis.Redis.from_url(url)
    try:
        if rig.read_line(proc, 60, "baseline start") != "ready":
            raise rig.BenchError("baseline: unexpected greeting")
        before = commandstats(client)
        redis_cpu = rig.cpu_seconds(opts.redis_pid)
        rig.send_line(proc, f"go {opts.seconds}")
        words = rig.read_line(proc, opts.seconds + 60, "baseline result").split()
        after = commandstats(client)
        if words[0] != "done":
            raise rig.BenchError(f"baseline: unexpected {words!r}")
        side.events, side.seconds = int(words[1]), float(words[2])
        side.cpu = {
            "publisher": 100 * float(words[3]) / side.seconds,
            "redis": 100 * (rig.cpu_seconds(opts.redis_pid) - redis_cpu) / side.seconds,
        }
        side.calls = after.get("cmdstat_evalsha", 0) - before.get("cmdstat_evalsha", 0)
        side.xadds = after.get("cmdstat_xadd", 0) - before.get("cmdstat_xadd", 0)
    finally:
        rig.Children.stop(proc)
        client.flushall()
        client.close()
    return side


def run_ours(children: rig.Children, url: str, opts: argparse.Namespace, log_dir: Path) -> Side:
    import redis

    from listenerpool import keys

    side = Side()
    upstream = FirehoseProcess(
        children, rate=opts.rate, chunk=opts.chunk, payload=opts.payload_bytes
    )
    worker = rig.start_worker(
        children, url, worker_id="bench-publish", capacity=opts.sessions,
        lease_ttl=LEASE_TTL, log_path=log_dir / "worker.log",
    )  # fmt: skip
    client = redis.Redis.from_url(url)
    sids = [f"pub-{i}" for i in range(opts.sessions)]
    state_keys = [keys.SessionKeys(sid).state for sid in sids]

    def published() -> int:
        pipe = client.pipeline(transaction=False)
        for key in state_keys:
            pipe.hget(key, "seq")
        return sum(int(v or 0) for v in pipe.execute())

    try:
        rig.claim_and_wait(
            url, sids, upstream.url, lease_ttl=LEASE_TTL, timeout=60, workers=[worker]
        )
        time.sleep(opts.warmup)
        before, stats0 = published(), commandstats(client)
        cpu0 = {"worker": rig.cpu_seconds(worker.pid), "redis": rig.cpu_seconds(opts.redis_pid),
                "upstream": rig.cpu_seconds(upstream.proc.pid)}  # fmt: skip
        started = time.monotonic()
        time.sleep(opts.seconds)
        side.events = published() - before
        side.seconds = time.monotonic() - started
        stats1 = commandstats(client)
        side.cpu = {
            "worker": 100 * (rig.cpu_seconds(worker.pid) - cpu0["worker"]) / side.seconds,
            "redis": 100 * (rig.cpu_seconds(opts.redis_pid) - cpu0["redis"]) / side.seconds,
            "upstream": 100
            * (rig.cpu_seconds(upstream.proc.pid) - cpu0["upstream"])
            / side.seconds,
        }
        side.calls = stats1.get("cmdstat_evalsha", 0) - stats0.get("cmdstat_evalsha", 0)
        side.xadds = stats1.get("cmdstat_xadd", 0) - stats0.get("cmdstat_xadd", 0)
        if worker.poll() is not None:
            raise rig.BenchError(f"worker exited with {worker.returncode}")
    finally:
        rig.Children.stop(worker, timeout=10)
        rig.Children.stop(upstream.proc)
        client.close()
    return side


def print_report(base: Side, ours: Side, opts: argparse.Namespace, machine: str) -> None:
    print()
    offered = "as fast as read" if not opts.rate else f"{opts.rate * opts.sessions:,.0f}/s offered"
    print(
        f"publish: {opts.sessions} busy sessions, {opts.payload_bytes}-byte events, {offered} "
        f"-- {machine}"
    )
    for name, side in (("baseline", base), ("worker", ours)):
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in side.cpu.items())
        per_call = side.xadds / side.calls if side.calls else 0.0
        print(
            f"  {name:<9} {side.rate:>10,.0f} events/s over {side.seconds:.1f}s; "
            f"{side.calls:,} script calls (any EVALSHA), {per_call:.1f} events per call; "
            f"CPU % of a core: {cpu}"
        )
    print()
    if ours.rate and "worker" in ours.cpu:
        worker_us = ours.cpu["worker"] / 100 / ours.rate * 1e6
        base_us = base.cpu["publisher"] / 100 / base.rate * 1e6 if base.rate else 0.0
        rig.figure(
            "worker_cpu_per_event",
            f"{worker_us:.1f} us",
            f"target <= {opts.target_cpu_us:g} us; {worker_us / base_us:.1f}x the pipelined "
            f"loop's {base_us:.1f} us"
            if base_us
            else f"target <= {opts.target_cpu_us:g} us",
            worker_us <= opts.target_cpu_us,
        )
    ratio = ours.rate / base.rate if base.rate else 0.0
    rig.figure("publish_events_per_s", f"{ours.rate:,.0f}")
    rig.figure("baseline_events_per_s", f"{base.rate:,.0f}")
    rig.figure(
        "publish_ratio",
        f"{ratio:.2f}",
        f"target >= {opts.target_ratio:.2f} of baseline events/s; "
        f"{ours.rate:,.0f} vs {base.rate:,.0f}",
        ratio >= opts.target_ratio,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    sub = parser.add_subparsers(dest="child")
    b = sub.add_parser("_baseline")
    b.add_argument("--redis-url", required=True)
    b.add_argument("--sessions", type=int, required=True)
    b.add_argument("--payload-bytes", type=int, default=PAYLOAD_BYTES)
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="busy sessions (100)")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="window (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="s before the window (2)")
    parser.add_argument("--chunk", type=int, default=16, help="events per upstream write (16)")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="events/s per session, one per write (0 = as fast as the worker reads)",
    )
    parser.add_argument("--payload-bytes", type=int, default=PAYLOAD_BYTES, help="(160)")
    parser.add_argument("--target-ratio", type=float, default=TARGET_RATIO, help="(0.30)")
    parser.add_argument(
        "--target-cpu-us", type=float, default=TARGET_CPU_US, help="worker CPU per event (60)"
    )
    parser.add_argument("--log-dir", default="", help="keep the worker log here")
    return parser.parse_args(argv)


def run(opts: argparse.Namespace) -> int:
    machine = rig.machine_line()
    with rig.Rig(opts.log_dir, "lp-pub-") as bench:
        server = bench.redis()
        machine += f", Redis {rig.redis_version(server.url)}"
        print(f"publish bench: {machine}", flush=True)
        assert server.process is not None
        opts.redis_pid = server.process.pid
        base = run_baseline(bench.children, server.url, opts)
        print(f"  baseline: {base.rate:,.0f} events/s", flush=True)
        ours = run_ours(bench.children, server.url, opts, bench.log_dir)
        print(f"  worker:   {ours.rate:,.0f} events/s", flush=True)
        print_report(base, ours, opts, machine)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child == "_baseline":
        return baseline_child(opts.redis_url, opts.sessions, opts.payload_bytes)
    return rig.run_guarded(run, opts)


if __name__ == "__main__":
    sys.exit(main())
