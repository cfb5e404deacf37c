"""A throw-away primary, its replica and three Sentinels on free loopback ports, for tests that
kill the primary and expect the pool to follow the Sentinels to the promoted replica.

Every wait is a condition polled against a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from listenerpool.testing.harness.redis_cluster import HOST, wait_for
from listenerpool.testing.loopthread import Service
from listenerpool.testing.redis_server import RedisServer, free_port

MASTER = "lp-primary"


class RedisSentinels(Service):
    """One primary, one replica, ``sentinels`` Sentinels (quorum 2). ``down_after_ms`` is how
    long the primary may be silent before the Sentinels fail it over."""

    def __init__(self, sentinels: int = 3, down_after_ms: int = 1000) -> None:
        self.root = tempfile.mkdtemp(prefix="lp-sentinel-")
        self.down_after_ms = down_after_ms
        self.primary = RedisServer()
        self.replica = RedisServer(
            extra_args=["--replicaof", HOST, str(self.primary.port)],
        )
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The pool's ``LP_REDIS_URL``."""
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}"

    def start(self, timeout: float = 30.0) -> None:
        try:
            self.primary.start()
            self.replica.start()
            for port in self.sentinel_ports:
                self.sentinels.append(self._start_sentinel(port))
            wait_for(self._ready, timeout, "a synced replica, and sentinels watching both")
        except BaseException:
            self.stop()
            raise

    def _start_sentinel(self, port: int) -> subprocess.Popen[bytes]:
        directory = Path(self.root) / f"sentinel-{port}"
        directory.mkdir()
        conf = directory / "sentinel.conf"
        conf.write_text(
            f"port {port}\n"
            f"bind {HOST}\n"
            f"dir {directory}\n"
            f"logfile {directory / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER} {HOST} {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        binary = shutil.which("redis-server")
        assert binary is not None
        return subprocess.Popen(
            [binary, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _ready(self) -> bool:
        # The replica must hold the data before anything may fail over to it.
        with redis.Redis(HOST, self.replica.port, socket_timeout=1.0) as client:
            if client.info("replication").get("master_link_status") != "up":
                return False
        for port in self.sentinel_ports:
            with redis.Redis(HOST, port, socket_timeout=1.0) as client:
                if not client.execute_command("SENTINEL", "REPLICAS", MASTER):
                    return False
                if len(client.execute_command("SENTINEL", "SENTINELS", MASTER)) < 2:
                    return False
        return True

    def primary_port(self) -> int:
        """The primary's port as the Sentinels report it now."""
        with redis.Redis(HOST, self.sentinel_ports[0], socket_timeout=1.0) as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
            return int(port)

    def kill_primary(self, timeout: float = 30.0) -> int:
        """SIGKILL the primary; returns the new primary's port once the Sentinels promoted the
        replica and it accepts writes."""
        old = self.primary_port()
        server = self.primary if self.primary.port == old else self.replica
        server.kill()

        def promoted() -> bool:
            port = self.primary_port()
            if port == old:
                return False
            with redis.Redis(HOST, port, socket_timeout=1.0) as client:
                return bool(client.info("replication")["role"] == "master")

        wait_for(promoted, timeout, "the replica promoted by the sentinels")
        return self.primary_port()

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.replica.stop()
        self.primary.stop()
        shutil.rmtree(self.root, ignore_errors=True)
