"""A pool on one machine for soak runs: its Redis, worker processes and gateway processes on
fixed ports (so a restarted gateway is found where its clients look for it).

The Redis is one of three topologies (``TOPOLOGIES``): ``single``, one server with an
append-only file that each worker reaches through a fault-injecting TCP proxy of its own (so
one worker can be cut off); ``cluster``, 3 primaries and 3 replicas
(:class:`~listenerpool.testing.harness.redis_cluster.RedisClusterNodes`); ``sentinel``, a
primary, its replica and 3 Sentinels
(:class:`~listenerpool.testing.harness.redis_sentinel.RedisSentinels`). On the last two the
workers reach the nodes directly: a cluster client and a Sentinel client connect to the
addresses the nodes and Sentinels announce, which a proxy in between would not change.

Every process can be killed, paused, stopped and restarted; a slot keeps its place in the fleet
across restarts (a restarted worker gets a new id, ``w<slot>.<generation>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel

from listenerpool.testing.harness.processes import GatewayProcesses, WorkerProcesses
from listenerpool.testing.harness.redis_cluster import HOST, RedisClusterNodes
from listenerpool.testing.harness.redis_sentinel import MASTER, RedisSentinels
from listenerpool.testing.redis_server import RedisServer, free_port
from listenerpool.testing.tcpproxy import TCPProxy

__all__ = ["TOPOLOGIES", "Fleet", "GatewaySlot", "WorkerSlot", "tcp_peers"]

TOPOLOGIES = ("single", "cluster", "sentinel")
CLIENT_TIMEOUT = 3.0  # the soak's own calls fail rather than hang on a frozen node


@dataclass(slots=True)
class WorkerSlot:
    index: int
    proxy: TCPProxy | None  # single Redis only: the worker's own way in, that can be cut
    direct_url: str = ""  # the pool's URL, where there is no proxy
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ids: list[str] = field(default_factory=list)  # every id this slot ran, oldest first

    @property
    def worker_id(self) -> str:
        return f"w{self.index}.{self.generation}"

    @property
    def redis_url(self) -> str:
        if self.proxy is None:
            return self.direct_url
        return f"redis://127.0.0.1:{self.proxy.port}/0"


@dataclass(slots=True)
class GatewaySlot:
    index: int
    port: int
    proc: subprocess.Popen[bytes] | None = None
    generation: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def tcp_peers(pid: int, remote_port: int) -> set[int]:
    """Local ports of the process's TCP connections to ``remote_port``, established or being
    set up (the kernel completes a connect a frozen process asked for)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {
        c.laddr.port
        for c in conns
        if c.raddr
        and c.raddr.port == remote_port
        and c.status in (psutil.CONN_ESTABLISHED, psutil.CONN_SYN_SENT)
    }


class Fleet:
    """``workers`` worker processes and ``gateways`` gateway processes on one Redis
    ``topology`` (see the module's docstring).

    ``settings`` go to every child as ``LP_*`` variables. Use :meth:`start` / :meth:`stop`
    (or ``async with``); everything is stopped on exit, paused processes included.
    """

    def __init__(
        self,
        log_dir: Path,
        settings: dict[str, Any],
        *,
        workers: int = 3,
        gateways: int = 2,
        topology: str = "single",
        sentinel_failover_timeout_ms: int = 5000,
    ) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown Redis topology {topology!r}; known: {TOPOLOGIES}")
        self.topology = topology
        self.log_dir = log_dir
        self.cluster: RedisClusterNodes | None = None
        self.sentinels: RedisSentinels | None = None
        self._single: RedisServer | None = None
        if topology == "cluster":
            self.cluster = RedisClusterNodes(node_timeout_ms=1000)
            self.url = self.cluster.url
        elif topology == "sentinel":
            self.sentinels = RedisSentinels(failover_timeout_ms=sentinel_failover_timeout_ms)
            self.url = self.sentinels.url
        else:
            self._single = RedisServer(persistent=True)
            self.url = self._single.url
        self.worker_procs = WorkerProcesses(log_dir, settings)
        self.gateway_procs = GatewayProcesses(log_dir, settings)
        self.workers = [
            WorkerSlot(
                i + 1,
                TCPProxy(self._single.port) if self._single is not None else None,
                direct_url=self.url,
            )
            for i in range(workers)
        ]
        self.gateways = [GatewaySlot(i + 1, free_port()) for i in range(gateways)]

    @property
    def redis(self) -> RedisServer:
        """The one server of a ``single`` topology (what its faults restart, pause, empty)."""
        if self._single is None:
            raise RuntimeError(f"a {self.topology} fleet has no single Redis server")
        return self._single

    def client(self, **options: Any) -> Any:
        """A new asyncio client on the fleet's Redis for the soak's own reads and writes, with
        timeouts (``options``, e.g. a username, go to its connections)."""
        timeouts = {
            "socket_timeout": CLIENT_TIMEOUT,
            "socket_connect_timeout": CLIENT_TIMEOUT,
            **options,
        }
        if self.cluster is not None:
            return AsyncRedisCluster(
                startup_nodes=[ClusterNode(HOST, port) for port in self.cluster.servers],
                **timeouts,
            )
        if self.sentinels is not None:
            sentinel = AsyncSentinel(
                [(HOST, port) for port in self.sentinels.sentinel_ports],
                socket_timeout=CLIENT_TIMEOUT,
                socket_connect_timeout=CLIENT_TIMEOUT,
            )
            return sentinel.master_for(MASTER, **timeouts)
        return aioredis.Redis.from_url(self.url, **timeouts)

    def data_nodes(self) -> list[int]:
        """Ports of the live Redis servers that hold data (primaries and replicas)."""
        if self.cluster is not None:
            return self.cluster.alive()
        if self.sentinels is not None:
            return [
                s.port
                for s in self.sentinels.servers()
                if s.process is not None and s.process.poll() is None
            ]
        return [self.redis.port]

    def on_every_node(self, *command: str) -> None:
        """Run ``command`` on every live data node (ACL changes are per server; blocking)."""
        for port in self.data_nodes():
            with redis.Redis(HOST, port, socket_timeout=CLIENT_TIMEOUT) as client:
                client.execute_command(*command)

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.start)
        elif self.sentinels is not None:
            await asyncio.to_thread(self.sentinels.start)
        else:
            self.redis.start()
        for slot in self.workers:
            if slot.proxy is not None:
                slot.proxy.start()
            self.start_worker(slot)
        await asyncio.gather(*(self.start_gateway(slot) for slot in self.gateways))

    def stop(self) -> None:
        self.worker_procs.stop_all()
        self.gateway_procs.stop_all()
        for slot in self.workers:
            if slot.proxy is not None:
                with contextlib.suppress(Exception):
                    slot.proxy.stop()
        if self.cluster is not None:
            self.cluster.stop()
        elif self.sentinels is not None:
            with contextlib.suppress(OSError):
                self.sentinels.save_logs(self.log_dir)
            self.sentinels.stop()
        else:
            self.redis.stop()

    def start_worker(self, slot: WorkerSlot) -> None:
        slot.generation += 1
        slot.ids.append(slot.worker_id)
        slot.proc = self.worker_procs.start(slot.redis_url, slot.worker_id)

    async def start_gateway(self, slot: GatewaySlot) -> None:
        slot.generation += 1
        name = f"gw{slot.index}.{slot.generation}"
        slot.proc, _ = await asyncio.to_thread(
            self.gateway_procs.start, self.url, name, port=slot.port
        )

    # -- faults ------------------------------------------------------------------------------
    @staticmethod
    async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
        """The exit code, or None if it still runs after ``timeout`` seconds."""
        try:
            return await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            return None

    async def kill(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a stopped process dies only once continued
            proc.kill()
        await self.wait_exit(proc, 10)

    @staticmethod
    def signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    # -- observation -------------------------------------------------------------------------
    @staticmethod
    def fd_kinds(pid: int) -> Counter[str]:
        """What a process's fds are: ``socket``, ``pipe``, ``anon_inode:[eventpoll]``, paths."""
        kinds: Counter[str] = Counter()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    kinds[
                        target.split(":", 1)[0] if target[:5] in ("socke", "pipe:") else target
                    ] += 1
        return kinds
