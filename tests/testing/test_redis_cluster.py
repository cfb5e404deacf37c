"""The throw-away cluster's nodes get distinct ports."""

from __future__ import annotations

import itertools
import shutil

import pytest

from listenerpool.testing.harness import redis_cluster
from listenerpool.testing.harness.redis_cluster import RedisClusterNodes


def test_two_nodes_never_draw_the_same_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ports are drawn at random and bound only when the nodes start: two draws of the same
    # port left a cluster of six with five nodes, which redis-cli refused to create.
    draws = itertools.chain([24000, 24000, 24000], itertools.count(24001))
    monkeypatch.setattr(redis_cluster.random, "randint", lambda _a, _b: next(draws))
    nodes = RedisClusterNodes(primaries=3, replicas=1)
    try:
        assert len(nodes.servers) == 6, sorted(nodes.servers)
    finally:
        shutil.rmtree(nodes.root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_after_a_failover_the_cluster_is_healthy_only_once_the_old_primary_replicates() -> None:
    # A demoted primary keeps calling itself a primary (without slots) for a moment. Called
    # healthy then, the next fault asked for the new primary's replica and found none, or
    # asked a replica still turning round for a CLUSTER FAILOVER that Redis then dropped.
    # The same shard is failed over back and forth: the primaries' votes about it must be
    # waited for too (Redis refuses a second vote within twice the node timeout).
    with RedisClusterNodes() as nodes:
        primary = nodes.primary_ports()[0]
        for _ in range(4):
            promoted = nodes.failover(primary)
            assert nodes.replica_of(promoted) == primary
            primary = promoted
