"""Chaos soak: 2 gateways, 3 workers and 500 sessions under random faults, then one table.

Faults, at random, each kind equally often (see ``listenerpool.testing.harness.faults``): worker
SIGKILL, SIGSTOP/SIGCONT (woken after its leases expired), SIGTERM, gateway SIGKILL, Redis
restart (append-only file), Redis paused, Redis data lost (restarted empty), a worker cut off
from Redis, a spec change whose 'reconnect' notice is lost (spec_change_notice_lost: a few
followed sessions PUT with a new header while Redis refuses the workers' control channel
subscriptions, so only the lease renewals can tell the readers), upstreams that die without a
FIN, upstream 500 bursts. Killed processes are restarted. Afterwards every session's history is
compared: what the upstream emitted, what the Redis stream holds, what every client received
(``listenerpool.testing.harness.history``), and every session's open upstream connection must carry
its last PUT's spec.

Exit status 0 when every loss, leak and stale-spec column is 0, 1 otherwise (or when the run
breaks).

    .venv/bin/python bench/chaos.py --duration 600 --faults-per-kind 22
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

# bench/ is sys.path[0] when this file runs as a script.
import rig

from listenerpool.testing.harness.faults import KINDS
from listenerpool.testing.harness.soak import SoakConfig, run_soak
from listenerpool.testing.harness.soak_table import format_table, headline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SoakConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=defaults.duration, help="seconds of faults")
    p.add_argument("--sessions", type=int, default=defaults.sessions)
    p.add_argument("--followed", type=int, default=defaults.followed,
                   help="sessions with a client on every gateway")  # fmt: skip
    p.add_argument("--workers", type=int, default=defaults.workers)
    p.add_argument("--gateways", type=int, default=defaults.gateways)
    p.add_argument("--rate", type=float, default=defaults.rate, help="events/s per session")
    p.add_argument("--faults-per-kind", type=int, default=defaults.faults_per_kind,
                   help="sets the fault period: duration / (kinds per lane x this)")  # fmt: skip
    p.add_argument("--lease-ttl", type=float, default=defaults.lease_ttl)
    p.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout)
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="fault kinds to inject, comma-separated (default: all of them):\n"
                   + "\n".join(KINDS))  # fmt: skip
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--log-dir", default="", help="keep the process logs here")
    p.add_argument("-v", "--verbose", action="store_true", help="log each fault")
    opts = p.parse_args(argv)
    unknown = set(opts.kinds.split(",")) - set(KINDS)
    if unknown:
        p.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    if opts.sessions < 1 or not 0 <= opts.followed <= opts.sessions:
        p.error("need --sessions >= 1 and 0 <= --followed <= --sessions")
    if opts.duration <= 0 or opts.faults_per_kind < 1 or opts.workers < 2 or opts.gateways < 1:
        p.error("need --duration > 0, --faults-per-kind >= 1, --workers >= 2, --gateways >= 1")
    return opts


def run(opts: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if opts.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    config = SoakConfig(
        duration=opts.duration,
        sessions=opts.sessions,
        followed=opts.followed,
        workers=opts.workers,
        gateways=opts.gateways,
        rate=opts.rate,
        faults_per_kind=opts.faults_per_kind,
        lease_ttl=opts.lease_ttl,
        idle_timeout=opts.idle_timeout,
        kinds=tuple(opts.kinds.split(",")),
        seed=opts.seed,
        log_dir=Path(opts.log_dir) if opts.log_dir else None,
    )
    print(f"chaos soak on {rig.machine_line()}", flush=True)
    try:
        result = asyncio.run(run_soak(config))
    except RuntimeError as exc:
        raise rig.BenchError(str(exc)) from exc
    print(headline(result))
    print(format_table(result))
    failures = result.failures()
    if result.totals.problems:
        print("first problems:", *result.totals.problems, sep="\n  ")
    if result.notes:
        print("notes:", *result.notes, sep="\n  ")
    if result.totals.overlap_problems:
        print("first overlaps:", *result.totals.overlap_problems, sep="\n  ")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS: every loss, leak and stale-spec column is 0")
    return 0


def main(argv: list[str] | None = None) -> int:
    return rig.run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
