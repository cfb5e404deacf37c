"""A pool on one machine for soak runs: a Redis with an append-only file, worker processes that
reach it through one fault-injecting TCP proxy each (so one worker can be cut off), and gateway
processes on fixed ports (so a restarted gateway is found where its clients look for it).

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

from listenerpool.testing.harness.processes import GatewayProcesses, WorkerProcesses
from listenerpool.testing.redis_server import RedisServer, free_port
from listenerpool.testing.tcpproxy import TCPProxy

__all__ = ["Fleet", "GatewaySlot", "WorkerSlot", "tcp_peers"]


@dataclass(slots=True)
class WorkerSlot:
    index: int
    proxy: TCPProxy
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ids: list[str] = field(default_factory=list)  # every id this slot ran, oldest first

    @property
    def worker_id(self) -> str:
        return f"w{self.index}.{self.generation}"

    @property
    def redis_url(self) -> str:
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
    """Local ports of the process's established TCP connections to ``remote_port``."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {
        c.laddr.port
        for c in conns
        if c.raddr and c.raddr.port == remote_port and c.status == psutil.CONN_ESTABLISHED
    }


class Fleet:
    """``workers`` worker processes and ``gateways`` gateway processes on one Redis.

    ``settings`` go to every child as ``LP_*`` variables. Use :meth:`start` / :meth:`stop`
    (or ``async with``); everything is stopped on exit, paused processes included.
    """

    def __init__(
        self, log_dir: Path, settings: dict[str, Any], *, workers: int = 3, gateways: int = 2
    ) -> None:
        self.redis = RedisServer(persistent=True)
        self.worker_procs = WorkerProcesses(log_dir, settings)
        self.gateway_procs = GatewayProcesses(log_dir, settings)
        self.workers = [WorkerSlot(i + 1, TCPProxy(self.redis.port)) for i in range(workers)]
        self.gateways = [GatewaySlot(i + 1, free_port()) for i in range(gateways)]

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.redis.start()
        for slot in self.workers:
            slot.proxy.start()
            self.start_worker(slot)
        await asyncio.gather(*(self.start_gateway(slot) for slot in self.gateways))

    def stop(self) -> None:
        self.worker_procs.stop_all()
        self.gateway_procs.stop_all()
        for slot in self.workers:
            with contextlib.suppress(Exception):
                slot.proxy.stop()
        self.redis.stop()

    def start_worker(self, slot: WorkerSlot) -> None:
        slot.generation += 1
        slot.ids.append(slot.worker_id)
        slot.proc = self.worker_procs.start(slot.redis_url, slot.worker_id)

    async def start_gateway(self, slot: GatewaySlot) -> None:
        slot.generation += 1
        name = f"gw{slot.index}.{slot.generation}"
        slot.proc, _ = await asyncio.to_thread(
            self.gateway_procs.start, self.redis.url, name, port=slot.port
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
