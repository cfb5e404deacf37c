"""Chaos soak: 2 gateways, 3 workers and 500 sessions under random faults, then one table.

The Redis (--redis): one server with an append-only file (single, the default), a Cluster of 3
primaries and 3 replicas (cluster), or a primary, its replica and 3 Sentinels (sentinel).

Faults, at random, each kind equally often (see ``listenerpool.testing.harness.faults``; which
kinds apply to which topology: --kinds below). Everywhere: worker SIGKILL, SIGSTOP/SIGCONT
(woken after its leases expired), SIGTERM, gateway SIGKILL, a spec change whose 'reconnect'
notice is lost (spec_change_notice_lost: a few followed sessions PUT with a new header while
every data node refuses the workers' control channel subscriptions, so only the lease renewals
can tell the readers), upstreams that die without a FIN, upstream 500 bursts. On one server:
Redis restart (append-only file), Redis paused, Redis data lost (restarted empty), a worker cut
off from Redis. On a Cluster: a primary SIGKILLed (its replica promoted, the node started again
as a replica), CLUSTER FAILOVER and CLUSTER FAILOVER FORCE, followed sessions' slots migrated to
another primary mid-stream, a shard (primary and replica) lost and started again empty. Behind
Sentinel: the primary SIGKILLed (the replica promoted, the old primary started again as a
replica), a Sentinel SIGKILLed and started again. Killed processes are restarted. Afterwards
every session's history is compared: what the upstream emitted, what the Redis stream holds,
what every client received (``listenerpool.testing.harness.history``), and every session's open
upstream connection must carry its last PUT's spec.

Recovery times, per fault kind, from the moment of the fault: for worker faults until each of
the worker's sessions listens again at a higher epoch elsewhere; for the Cluster and Sentinel
faults until each affected session (on the faulted shard's or the migrated slots; every
session when a Sentinel primary dies; the followed ones when a Sentinel dies) is listening,
its stream holds an event the upstream emitted after the fault's last stored one, and every
client following it received such an event ("listening and delivering"). A session not
there within 60 s counts in "sessions not listening again within 60 s".

Exit status 0 when every loss, leak and stale-spec column is 0, 1 otherwise (or when the run
breaks).

    .venv/bin/python bench/chaos.py --duration 600 --faults-per-kind 22
    .venv/bin/python bench/chaos.py --redis cluster --duration 600 --faults-per-kind 17
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

# bench/ is sys.path[0] when this file runs as a script.
import rig

from listenerpool.testing.harness.fault_kinds import KINDS, KINDS_FOR, WHERE, refused_kinds
from listenerpool.testing.harness.fleet import TOPOLOGIES
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
    p.add_argument("--redis", choices=TOPOLOGIES, default="single",
                   help="the Redis topology (default: single)")  # fmt: skip
    p.add_argument("--kinds", default="",
                   help="fault kinds to inject, comma-separated (default: every kind that "
                   "applies to --redis); a kind that does not apply is refused. Kind: where\n"
                   + "\n".join(f"{k}: {WHERE[k]}" for k in KINDS))  # fmt: skip
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--log-dir", default="", help="keep the process logs here")
    p.add_argument("-v", "--verbose", action="store_true", help="log each fault")
    opts = p.parse_args(argv)
    kinds = tuple(opts.kinds.split(",")) if opts.kinds else KINDS_FOR[opts.redis]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    refused = refused_kinds(opts.redis, kinds)
    if refused:
        p.error(
            f"fault kinds {', '.join(refused)} do not apply to --redis {opts.redis}; "
            f"those that do: {', '.join(KINDS_FOR[opts.redis])}"
        )
    opts.kinds = kinds
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
        kinds=opts.kinds,
        seed=opts.seed,
        log_dir=Path(opts.log_dir) if opts.log_dir else None,
        redis=opts.redis,
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
