"""The chaos soak, short: 2 gateways, 3 workers, 40 sessions, every fault kind once in 30 s
with a 3 s lease, then the history check (bench/chaos.py runs the long one); on one Redis, on a
Redis Cluster and behind Sentinel (each with the kinds that apply to it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from listenerpool.testing.harness.fault_kinds import DELIVERY_KINDS, KINDS_FOR
from listenerpool.testing.harness.soak import SoakConfig, SoakResult, run_soak
from listenerpool.testing.harness.soak_table import format_table, headline

pytestmark = pytest.mark.timeout(240)


def why(result: SoakResult) -> tuple[list[str], list[str], list[str]]:
    """What a failed soak says about itself: the first problems, overlaps and notes (the
    processes' logs are in the test's temporary directory)."""
    return result.totals.problems, result.totals.overlap_problems, result.notes


async def test_no_event_is_lost_duplicated_or_reordered_under_random_faults(
    tmp_path: Path,
) -> None:
    result = await run_soak(
        SoakConfig(
            duration=30,
            sessions=40,
            followed=10,
            rate=2.0,
            faults_per_kind=1,
            lease_ttl=3.0,
            idle_timeout=3.0,
            seed=3,
            log_dir=tmp_path,
        )
    )
    print(headline(result))
    print(format_table(result))
    assert result.failures() == [], why(result)
    assert all(result.injected.get(kind, 0) == 1 for kind in KINDS_FOR["single"]), result.injected
    t = result.totals
    assert t.emitted > 0 and t.delivered == t.expected_deliveries > 0
    assert result.failover["worker_kill"], "a killed worker held no session"
    # The stale-spec column is in failures(); it says something only if the backstop had work.
    assert result.spec_notices_missed > 0, "every spec change's notice reached a worker"


@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
async def test_the_soak_holds_on_a_redis_cluster_and_behind_sentinel(
    topology: str, tmp_path: Path
) -> None:
    """The same soak on a Cluster (3 primaries, 3 replicas: primaries killed and failed over,
    slots migrated, a shard lost whole) and behind Sentinel (the primary killed, a Sentinel
    killed), every kind that applies there once."""
    result = await run_soak(
        SoakConfig(
            duration=30,
            sessions=40,
            followed=10,
            rate=2.0,
            faults_per_kind=1,
            lease_ttl=3.0,
            idle_timeout=3.0,
            seed=3,
            redis=topology,
            log_dir=tmp_path,
        )
    )
    print(headline(result))
    print(format_table(result))
    assert result.failures() == [], why(result)
    kinds = KINDS_FOR[topology]
    assert all(result.injected.get(kind, 0) == 1 for kind in kinds), result.injected
    t = result.totals
    assert t.emitted > 0 and t.delivered == t.expected_deliveries > 0
    # Each topology fault hit sessions that were running, and each of them delivered again.
    for kind in kinds:
        if kind in DELIVERY_KINDS:
            assert result.failover.get(kind), f"{kind} affected no session"
