"""Worker and gateway child processes (``python -m workers`` / ``python -m gateway``) for tests,
benchmarks and soak runs: settings passed as ``LP_*`` variables, one log file per process.

Children die with their parent even when it is SIGKILLed (``PR_SET_PDEATHSIG`` on Linux), and
:meth:`ChildProcesses.stop_all` kills whatever still runs (a SIGSTOPped child is woken first).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from listenerpool.testing.redis_server import free_port

__all__ = ["ChildProcesses", "GatewayProcesses", "WorkerProcesses", "die_with_parent"]

ROOT = Path(__file__).resolve().parents[3]
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` of every child: SIGKILL it when the parent dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ChildProcesses:
    """Children started by one test or run, each logging to ``<log_dir>/<name>.log``.

    ``defaults`` are settings (``lease_ttl=2.0`` becomes ``LP_LEASE_TTL=2.0``) given to every
    child; per-child settings override them. ``LP_*`` variables of the parent are not inherited.
    """

    def __init__(self, log_dir: Path, defaults: Mapping[str, Any] | None = None) -> None:
        self.log_dir = log_dir
        self.defaults = dict(defaults or {})
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, module: str, name: str, env_settings: Mapping[str, Any]
    ) -> subprocess.Popen[bytes]:
        """``python -m <module>`` with the defaults and ``env_settings`` as LP_* variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LP_")}
        for key, value in {**self.defaults, **env_settings}.items():
            env[f"LP_{key.upper()}"] = str(value)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
            preexec_fn=die_with_parent,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()


class WorkerProcesses(ChildProcesses):
    """``python -m workers`` children."""

    def start(self, redis_url: str, worker_id: str, **settings: Any) -> subprocess.Popen[bytes]:
        return self.spawn(
            "workers", worker_id, {**settings, "redis_url": redis_url, "worker_id": worker_id}
        )


class GatewayProcesses(ChildProcesses):
    """``python -m gateway`` children on free ports."""

    def start(
        self,
        redis_url: str,
        name: str,
        *,
        port: int | None = None,
        timeout: float = 60.0,
        **settings: Any,
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start a gateway (on ``port``, default a free one); returns the process and its base
        URL once ``/healthz`` answers. Blocks the calling thread while waiting."""
        port = port or free_port()
        proc = self.spawn(
            "gateway",
            name,
            {"log_level": "WARNING", **settings, "redis_url": redis_url, "port": port},
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway {name} did not start: {self.log(name)[-2000:]}")
            time.sleep(0.05)
