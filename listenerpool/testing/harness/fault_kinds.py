"""The soak's fault kinds, which Redis topology each applies to, and what its recovery time
measures (:mod:`listenerpool.testing.harness.faults` injects them).

Two recovery measures, both from the moment the fault is injected:

- *listening elsewhere* (the worker faults): until each session the faulted worker ran is
  listening again at a higher epoch, on another reader;
- *listening and delivering* (the Redis topology faults): until each affected session (those
  whose hash slots the faulted node or shard served, or the migrated slots' sessions; behind
  Sentinel every session for a primary's loss, the followed sessions for a Sentinel's) is in
  state ``listening`` with an event in its Redis stream that the upstream numbered above the
  last one stored at the fault, and every client following it has received such an event.

A session that does not get there within ``TRACK_TIMEOUT`` counts as not recovered.
"""

from __future__ import annotations

__all__ = [
    "CLUSTER_KINDS",
    "DATA_LOSS_KINDS",
    "DELIVERY_KINDS",
    "FLEET_KINDS",
    "KINDS",
    "KINDS_FOR",
    "PROCESS_KINDS",
    "SENTINEL_KINDS",
    "SINGLE_KINDS",
    "TRACK_TIMEOUT",
    "UPSTREAM_KINDS",
    "WHERE",
    "refused_kinds",
]

TRACK_TIMEOUT = 60.0  # a session not recovered within this long counts as not recovered

# Faults on the pool's own processes and on the upstream: the same on every topology.
PROCESS_KINDS = ("worker_kill", "worker_stop", "worker_term", "gateway_kill")
# A spec change whose 'reconnect' notice is lost: the pool's Redis user is refused the control
# channel on every data node.
SPEC_KINDS = ("spec_change_notice_lost",)
# One Redis server, which each worker reaches through a proxy of its own.
SINGLE_KINDS = ("redis_restart", "redis_pause", "redis_lose_data", "worker_partition")
CLUSTER_KINDS = (
    "primary_kill",  # SIGKILL a primary; its replica is promoted; the node comes back a replica
    "cluster_failover",  # CLUSTER FAILOVER on a replica (coordinated: no write lost)
    "cluster_failover_force",  # CLUSTER FAILOVER FORCE (unreplicated writes lost)
    "slot_migrate",  # followed sessions' slots moved to another primary mid-stream
    "shard_lost",  # a primary and its replica killed and started again empty
)
SENTINEL_KINDS = (
    "sentinel_primary_kill",  # SIGKILL the primary; Sentinel promotes the replica
    "sentinel_kill",  # SIGKILL one of the three Sentinels, started again
)
UPSTREAM_KINDS = ("upstream_vanish", "upstream_500")
FLEET_KINDS = PROCESS_KINDS + SINGLE_KINDS + SPEC_KINDS + CLUSTER_KINDS + SENTINEL_KINDS
KINDS = FLEET_KINDS + UPSTREAM_KINDS

KINDS_FOR: dict[str, tuple[str, ...]] = {
    "single": PROCESS_KINDS + SINGLE_KINDS + SPEC_KINDS + UPSTREAM_KINDS,
    "cluster": PROCESS_KINDS + SPEC_KINDS + CLUSTER_KINDS + UPSTREAM_KINDS,
    "sentinel": PROCESS_KINDS + SPEC_KINDS + SENTINEL_KINDS + UPSTREAM_KINDS,
}
# Kinds whose recovery is "listening and delivering" (the others: see the module docstring).
DELIVERY_KINDS = CLUSTER_KINDS + SENTINEL_KINDS
# Kinds after which a stream may rightly start later than event 1: the history was lost whole
# and what the workers wrote back starts later. (A failover's unreplicated writes are only the
# newest ones, which the readers publish again: not in this set.)
DATA_LOSS_KINDS = ("redis_lose_data", "shard_lost")

# Where each kind applies, and why not elsewhere, for the help text.
WHERE = {
    "worker_kill": "all",
    "worker_stop": "all",
    "worker_term": "all",
    "gateway_kill": "all",
    "spec_change_notice_lost": "all (the control channel refused on every data node)",
    "redis_restart": "single (a topology restarts nodes by its own kinds)",
    "redis_pause": "single",
    "redis_lose_data": "single (cluster: shard_lost)",
    "worker_partition": "single (cluster and Sentinel clients reach the nodes' own "
    "addresses, so no proxy can stand between one worker and Redis)",
    "primary_kill": "cluster",
    "cluster_failover": "cluster",
    "cluster_failover_force": "cluster",
    "slot_migrate": "cluster",
    "shard_lost": "cluster",
    "sentinel_primary_kill": "sentinel",
    "sentinel_kill": "sentinel",
    "upstream_vanish": "all",
    "upstream_500": "all",
}


def refused_kinds(topology: str, kinds: tuple[str, ...]) -> list[str]:
    """The kinds in ``kinds`` that do not apply to ``topology``."""
    return [k for k in kinds if k not in KINDS_FOR[topology]]
