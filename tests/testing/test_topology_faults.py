"""The soak's cluster faults change the topology one at a time, each on a healthy cluster: a
manual failover asked of a replica still syncing after the previous fault is dropped by Redis,
and the soak then failed on the cluster's limits instead of testing the pool. And a SIGSTOPped
worker's upstream connections are listed while it is frozen, so the overlaps it causes are
told apart from the pool's."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest

from listenerpool.testing.harness import faults as faults_module
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


class FrozenWorkerFleet:
    """A worker that reconnects upstream until it is SIGSTOPped: its ports at each moment."""

    def __init__(self) -> None:
        self.frozen = False
        self.port = 40000

    def signal(self, proc: Any, signum: int) -> None:
        self.frozen = signum == signal.SIGSTOP

    def ports(self, pid: int, remote_port: int) -> set[int]:
        listed = {self.port}
        if not self.frozen:
            self.port += 1  # a reconnect right after the listing, before any signal
        return listed


async def test_a_stopped_workers_connections_are_listed_once_it_is_frozen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = FrozenWorkerFleet()
    monkeypatch.setattr(faults_module, "tcp_peers", fleet.ports)
    injector = FaultInjector(
        cast(Fleet, fleet),
        cast(SSEUpstream, SimpleNamespace(port=1)),
        None,
        [],
        lease_ttl=0.3,
        idle_timeout=3.0,
        rng=random.Random(0),
        kinds=["worker_stop"],
    )
    slot = SimpleNamespace(proc=SimpleNamespace(pid=1), worker_id="w")

    async def busiest() -> tuple[Any, dict[str, int]]:
        return slot, {}

    injector._busiest_worker = busiest  # type: ignore[method-assign]
    await asyncio.wait_for(injector.worker_stop(), 10)
    [window] = injector.paused
    # What the frozen process held, not what it held just before.
    assert window.ports == frozenset({fleet.port})
