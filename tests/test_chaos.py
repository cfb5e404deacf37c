"""The chaos soak, short: 2 gateways, 3 workers, 40 sessions, every fault kind once in 30 s
with a 3 s lease, then the history check (bench/chaos.py runs the long one)."""

from __future__ import annotations

import pytest

from listenerpool.testing.harness.fault_kinds import KINDS_FOR
from listenerpool.testing.harness.soak import SoakConfig, run_soak
from listenerpool.testing.harness.soak_table import format_table, headline

pytestmark = pytest.mark.timeout(240)


async def test_no_event_is_lost_duplicated_or_reordered_under_random_faults() -> None:
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
        )
    )
    print(headline(result))
    print(format_table(result))
    assert result.failures() == [], (result.totals.problems, result.notes)
    assert all(result.injected.get(kind, 0) == 1 for kind in KINDS_FOR["single"]), result.injected
    t = result.totals
    assert t.emitted > 0 and t.delivered == t.expected_deliveries > 0
    assert result.failover["worker_kill"], "a killed worker held no session"
    # The stale-spec column is in failures(); it says something only if the backstop had work.
    assert result.spec_notices_missed > 0, "every spec change's notice reached a worker"
