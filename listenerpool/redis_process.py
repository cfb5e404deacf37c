"""``redis-server`` child processes on free loopback ports: the embedded pool's Redis, and the
test kit's throw-away servers that tests kill, restart and pause without disturbing anything
else on the machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from listenerpool.service import Service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer(Service):
    """One ``redis-server`` child process.

    ``persistent=True`` turns on an fsync-always append-only file in a private directory, so
    :meth:`kill` + :meth:`start` keeps the data (a crash-and-restart); otherwise a restart comes
    back empty. :meth:`stop` removes the directory.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        persistent: bool = False,
        extra_args: Sequence[str] = (),
        directory: str | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary = binary
        self.port = port or free_port()
        self.persistent = persistent
        self.extra_args = list(extra_args)  # e.g. cluster or replication options
        self.dir = directory or tempfile.mkdtemp(prefix="lp-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        args += self.extra_args
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **self.process_options()
        )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.01)

    def process_options(self) -> dict[str, Any]:
        """More ``subprocess.Popen`` arguments for the child (none here: a test's server is
        stopped by its fixture)."""
        return {}

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def lose_data(self) -> None:
        """Kill the server and start it again with nothing: its files are deleted in between,
        as a failover to an empty replica or a restart without persistence would leave it."""
        self.kill()
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if name == "redis.log":
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        self.start()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
