"""Worker registration and heartbeat in ``lp:workers`` (id -> heartbeat deadline, ms)."""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from typing import Any

from listenerpool import keys


def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "worker"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


async def heartbeat(
    redis: Any, worker_id: str, *, capacity: int, load: int, ttl: float, started: float
) -> None:
    """Announce this worker for ``3 * ttl``; the hash expires on its own if the worker dies."""
    deadline_ms = int((time.time() + 3 * ttl) * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.WORKERS, {worker_id: deadline_ms})
        pipe.hset(
            keys.worker_key(worker_id),
            mapping={
                "capacity": capacity,
                "load": load,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": int(started * 1000),
                "heartbeat": int(time.time() * 1000),
            },
        )
        pipe.pexpire(keys.worker_key(worker_id), int(3 * ttl * 1000))
        # Entries of workers that died long ago would otherwise pile up.
        pipe.zremrangebyscore(keys.WORKERS, "-inf", int(time.time() * 1000) - 3600_000)
        await pipe.execute()


async def deregister(redis: Any, worker_id: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(keys.WORKERS, worker_id)
        pipe.delete(keys.worker_key(worker_id))
        await pipe.execute()
