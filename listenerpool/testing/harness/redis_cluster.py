"""A throw-away local Redis Cluster (``redis-server --cluster-enabled yes`` processes on free
loopback ports, joined with ``redis-cli --cluster create``), for tests that fail over primaries
and move hash slots under a running pool.

Every wait is a condition polled against a deadline, but one: before a promotion it sleeps
out Redis's rule against a second vote about a shard within twice the node timeout, which
no command reports.
"""

from __future__ import annotations

import math
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import redis

from listenerpool.testing.loopthread import Service
from listenerpool.testing.redis_server import RedisServer

HOST = "127.0.0.1"


def cluster_port(taken: Collection[int] = ()) -> int:
    """A free port whose cluster bus port (port + 10000) is free too, and not in ``taken``
    (ports already chosen for nodes that have not started yet, so not bound either)."""
    for _ in range(1000):
        port = random.randint(20000, 30000)
        if port in taken:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind((HOST, candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One line of ``CLUSTER NODES``."""

    id: str
    port: int
    role: str  # "primary" or "replica"
    failed: bool
    primary: str  # the primary's id for a replica, "-" for a primary
    slots: tuple[str, ...]  # ranges like "0-5460"

    def serves(self, slot: int) -> bool:
        for item in self.slots:
            first, _, last = item.partition("-")
            if int(first) <= slot <= int(last or first):
                return True
        return False


def start_empty(server: RedisServer) -> None:
    """Start a killed node with no data. Without persistence a node still keeps the snapshot
    of its last full sync as a replica (``dump.rdb``, written on load) and would read it back
    at start: an old state of the data, not none. Its ``nodes.conf`` and log stay."""
    for entry in Path(server.dir).iterdir():
        if entry.name in ("nodes.conf", "redis.log"):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    server.start()


class ClusterNotReady(RuntimeError):
    """The cluster did not reach the state waited for in time."""


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 20 ms until true; raise :class:`ClusterNotReady` at the
    deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.exceptions.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ClusterNotReady(f"{what}: not within {timeout}s")
        time.sleep(0.02)


class RedisClusterNodes(Service):
    """``primaries`` primaries with ``replicas`` replicas each. ``node_timeout_ms`` is
    ``cluster-node-timeout``: how long a primary may be unreachable before its replica is
    promoted. :meth:`stop` kills every node and removes their directories."""

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not on PATH")
        self.root = tempfile.mkdtemp(prefix="lp-cluster-")
        self.node_timeout = node_timeout_ms / 1000
        self._last_promotion = -math.inf  # monotonic time the last failover ended
        self.primaries = primaries
        self.replicas = replicas
        self.servers: dict[int, RedisServer] = {}
        for i in range(primaries * (1 + replicas)):
            port = cluster_port(taken=self.servers)
            directory = Path(self.root) / f"node-{i}"
            directory.mkdir()
            self.servers[port] = RedisServer(
                port=port,
                directory=str(directory),
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms),
                    # A replica may be promoted however long it was cut off from its primary.
                    "--cluster-replica-validity-factor", "0",
                    "--cluster-require-full-coverage", "no",
                    "--cluster-allow-reads-when-down", "no",
                    # A restarted node syncs at once, not after a 5 s wait for more replicas.
                    "--repl-diskless-sync-delay", "0",
                ],
            )  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The pool's ``LP_REDIS_URL`` for this cluster."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.servers)

    def start(self, timeout: float = 30.0) -> None:
        try:
            for server in self.servers.values():
                server.start()
            subprocess.run(
                ["redis-cli", "--cluster", "create",
                 *(f"{HOST}:{port}" for port in self.servers),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout,
            )  # fmt: skip
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what the nodes say ------------------------------------------------------------------
    def client(self, port: int) -> redis.Redis:
        return redis.Redis(HOST, port, socket_timeout=2.0, socket_connect_timeout=1.0)

    def alive(self) -> list[int]:
        return [port for port, s in self.servers.items() if s.process and s.process.poll() is None]

    def nodes(self, port: int | None = None) -> list[NodeInfo]:
        """``CLUSTER NODES`` as seen by ``port`` (default: any live node)."""
        asked = port if port is not None else self.alive()[0]
        with self.client(asked) as c:
            text = c.execute_command("CLUSTER", "NODES").decode()
        out = []
        for line in text.strip().splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            out.append(
                NodeInfo(
                    id=fields[0],
                    port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                    role="primary" if "master" in flags else "replica",
                    failed="fail" in flags or "fail?" in flags,
                    primary=fields[3],
                    slots=tuple(s for s in fields[8:] if not s.startswith("[")),
                )
            )
        return out

    def primary_ports(self) -> list[int]:
        return sorted(
            n.port for n in self.nodes() if n.role == "primary" and n.slots and not n.failed
        )

    def owner(self, slot: int) -> int:
        """The port of the primary serving ``slot``."""
        for node in self.nodes():
            if node.role == "primary" and not node.failed and node.serves(slot):
                return node.port
        raise ClusterNotReady(f"no primary serves slot {slot}")

    def replica_of(self, primary_port: int) -> int:
        nodes = self.nodes()
        primary_id = next(n.id for n in nodes if n.port == primary_port)
        return next(n.port for n in nodes if n.primary == primary_id and not n.failed)

    def healthy(self) -> bool:
        """Every live node says ``cluster_state:ok``, all 16384 slots are served, every live
        replica is in sync with its primary, and the live nodes agree on who serves what and
        who replicates whom, with no live node seen as failed and none a primary without
        slots (a demoted primary that has not yet turned into its successor's replica: a
        fault that picks a shard's replica then would find none, or the wrong one)."""
        alive = set(self.alive())
        views = set()
        for port in alive:
            with self.client(port) as c:
                info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
                replication = c.info("replication")
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return False
            nodes = [n for n in self.nodes(port) if n.port in alive]
            if any(n.failed or (n.role == "primary" and not n.slots) for n in nodes):
                return False
            port_of = {n.id: n.port for n in nodes}
            views.add(
                tuple(
                    sorted(
                        (n.port, n.slots if n.role == "primary" else (), port_of.get(n.primary))
                        for n in nodes
                    )
                )
            )
        return len(views) == 1

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for(self.healthy, timeout, "cluster_state:ok on every node with one map of the nodes")

    # -- faults ------------------------------------------------------------------------------
    def failover(self, primary_port: int, timeout: float = 20.0, *, force: bool = False) -> int:
        """``CLUSTER FAILOVER`` on a replica of ``primary_port`` (``FORCE``: without the
        primary's agreement, so writes it had not replicated yet are lost); returns the new
        primary's port once every node agrees."""
        replica = self.replica_of(primary_port)
        self._wait_for_votes()
        with self.client(replica) as c:
            c.execute_command("CLUSTER", "FAILOVER", *(["FORCE"] if force else []))
        wait_for(
            lambda: replica in self.primary_ports() and primary_port not in self.primary_ports(),
            timeout,
            f"replica {replica} promoted",
        )
        self._last_promotion = time.monotonic()
        self.wait_healthy(timeout)
        return replica

    def _wait_for_votes(self) -> None:
        """Sleep until the primaries will vote again. A primary refuses its vote about a shard's
        primary within twice the node timeout of its last vote about it, and a manual failover
        that gets no votes is dropped after 5 s: a shard failed over twice in quick succession
        then stays as it was."""
        time.sleep(max(0.0, self._last_promotion + 2 * self.node_timeout + 0.5 - time.monotonic()))

    def kill(self, port: int, timeout: float = 20.0) -> int:
        """SIGKILL the primary on ``port``; returns its replica's port once it is promoted and
        the cluster is healthy again (without the killed node)."""
        replica = self.replica_of(port)
        self._wait_for_votes()
        self.servers[port].kill()
        wait_for(lambda: replica in self.primary_ports(), timeout, f"replica {replica} promoted")
        self._last_promotion = time.monotonic()
        self.wait_healthy(timeout)
        return replica

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Start the killed node on ``port`` again, empty (its ``nodes.conf`` kept), and wait
        until the cluster is healthy with it: a former primary whose replica was promoted comes
        back as that replica's replica."""
        start_empty(self.servers[port])
        self.wait_healthy(timeout)

    def lose_shard(self, primary_port: int, timeout: float = 30.0) -> int:
        """SIGKILL the primary on ``primary_port`` and its replica, then start both again empty
        (the primary first, so it serves its slots again rather than an empty replica being
        promoted): the shard's data is gone, its slots served by the same nodes. Returns the
        replica's port once the cluster is healthy again."""
        replica = self.replica_of(primary_port)
        self.servers[primary_port].kill()
        self.servers[replica].kill()
        start_empty(self.servers[primary_port])
        start_empty(self.servers[replica])
        self.wait_healthy(timeout)
        return replica

    def move_slot(self, slot: int, to_port: int, *, batch: int = 100) -> int:
        """Migrate ``slot`` and its keys to the primary on ``to_port`` as ``redis-cli --cluster
        reshard`` does (IMPORTING/MIGRATING, MIGRATE in batches, SETSLOT NODE on every
        primary). Returns how many keys moved."""
        source = self.owner(slot)
        if source == to_port:
            return 0
        nodes = self.nodes()
        source_id = next(n.id for n in nodes if n.port == source)
        target_id = next(n.id for n in nodes if n.port == to_port)
        moved = 0
        with self.client(to_port) as target, self.client(source) as src:
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                found = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not found:
                    break
                src.execute_command(
                    "MIGRATE", HOST, to_port, "", 0, 5000, "REPLACE", "KEYS", *found
                )
                moved += len(found)
            target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for port in self.primary_ports():
            if port not in (source, to_port):
                with self.client(port) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_healthy()
        return moved
