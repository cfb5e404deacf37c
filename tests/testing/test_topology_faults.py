"""The soak's cluster faults change the topology one at a time, each on a healthy cluster: a
manual failover asked of a replica still syncing after the previous fault is dropped by Redis,
and the soak then failed on the cluster's limits instead of testing the pool."""

from __future__ import annotations

import asyncio
import random
import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest

from listenerpool.testing.harness.faults import FaultInjector
from listenerpool.testing.harness.fleet import Fleet
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import eventually

# How long the fake node's restart waits for a failover to begin meanwhile: with faults in
# turn none does, so it is the whole restart.
RESTART_WAIT = 2.0


class FakeCluster:
    """Records the order of topology calls; a restart is the window a failover must not hit."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self.failover_began = threading.Event()

    def _note(self, what: str) -> None:
        with self._lock:
            self.calls.append(what)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        self._note("healthy?")

    def kill(self, port: int) -> int:
        self._note("kill")
        return port + 1

    def restart(self, port: int) -> None:
        self._note("restart begins")
        self.failover_began.wait(RESTART_WAIT)
        self._note("restart ends")

    def failover(self, port: int, *, force: bool = False) -> int:
        self.failover_began.set()
        self._note("failover")
        return port + 1


@pytest.mark.timeout(30)
async def test_a_failover_waits_for_the_killed_primary_to_be_back_and_the_cluster_healthy() -> None:
    cluster = FakeCluster()
    fleet = cast(Fleet, SimpleNamespace(cluster=cluster))
    injector = FaultInjector(
        fleet,
        cast(SSEUpstream, None),
        None,
        [],
        lease_ttl=3.0,
        idle_timeout=3.0,
        rng=random.Random(0),
        kinds=["primary_kill", "cluster_failover"],
    )

    async def some_primary() -> tuple[int, list[str]]:
        return 7000, []

    async def no_tops(sids: Any) -> dict[str, int]:
        return {}

    injector._some_primary = some_primary  # type: ignore[method-assign]
    injector._tops = no_tops  # type: ignore[method-assign]
    kill = asyncio.create_task(injector.primary_kill())
    await eventually(lambda: "restart begins" in cluster.calls, 10, "no restart began")
    await asyncio.wait_for(
        asyncio.gather(kill, injector.cluster_failover(force=False)), RESTART_WAIT * 5
    )
    assert cluster.calls == [
        "healthy?",
        "kill",
        "restart begins",
        "restart ends",
        "healthy?",
        "failover",
    ]
