"""A throw-away primary, its replica and three Sentinels on free loopback ports, for tests that
kill the primary and expect the pool to follow the Sentinels to the promoted replica.

Every wait is a condition polled against a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import redis

from listenerpool.replies import reply_text
from listenerpool.testing.harness.redis_cluster import HOST, start_empty, wait_for
from listenerpool.testing.loopthread import Service
from listenerpool.testing.redis_server import RedisServer, free_port

MASTER = "lp-primary"
# A replica (re)starting syncs at once instead of after the primary's default 5 s wait for more
# replicas to share a diskless transfer with.
NO_SYNC_DELAY = ["--repl-diskless-sync-delay", "0"]
# How long a primary may be silent before the Sentinels fail it over. At 1 s a loaded 2-core
# host delayed a just-promoted primary's replies past it: the Sentinels failed it over again,
# to the node restarted empty a second before, and the old one kept taking writes on the
# connections it had for 10 s (two primaries: two workers each holding the same leases).
DOWN_AFTER_MS = 3000


class RedisSentinels(Service):
    """One primary, one replica, ``sentinels`` Sentinels (quorum 2). ``down_after_ms`` is how
    long the primary may be silent before the Sentinels fail it over."""

    def __init__(
        self,
        sentinels: int = 3,
        down_after_ms: int = DOWN_AFTER_MS,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.root = tempfile.mkdtemp(prefix="lp-sentinel-")
        self.down_after_ms = down_after_ms
        # A Sentinel starts no failover of the same primary within twice this of its last one.
        self.failover_timeout_ms = failover_timeout_ms
        self.primary = RedisServer(extra_args=NO_SYNC_DELAY)
        self.replica = RedisServer(
            extra_args=[*NO_SYNC_DELAY, "--replicaof", HOST, str(self.primary.port)],
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
        """Start the Sentinel on ``port``; a restarted one reads the configuration it rewrote
        itself (the primary it last knew, the other Sentinels)."""
        directory = Path(self.root) / f"sentinel-{port}"
        directory.mkdir(exist_ok=True)
        conf = directory / "sentinel.conf"
        if not conf.exists():
            conf.write_text(
                f"port {port}\n"
                f"bind {HOST}\n"
                f"dir {directory}\n"
                f"logfile {directory / 'sentinel.log'}\n"
                f"sentinel monitor {MASTER} {HOST} {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}\n"
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

    def servers(self) -> list[RedisServer]:
        """The two data nodes, whichever is primary now."""
        return [self.primary, self.replica]

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers() if s.port == port)

    def restart_as_replica(self, port: int, timeout: float = 30.0) -> None:
        """Start the killed node on ``port`` again (empty: no persistence) as a replica of the
        current primary, and wait until it holds the primary's data and the Sentinels list
        it, so that the next failover has a replica to promote."""
        primary = self.primary_port()
        server = self.server_on(port)
        server.extra_args = [*NO_SYNC_DELAY, "--replicaof", HOST, str(primary)]
        start_empty(server)

        def synced() -> bool:
            with redis.Redis(HOST, port, socket_timeout=1.0) as client:
                info = client.info("replication")
                if info.get("role") != "slave" or info.get("master_link_status") != "up":
                    return False
                if int(info.get("master_port", 0)) != primary:
                    return False
            for sentinel in self.sentinel_ports:
                with redis.Redis(HOST, sentinel, socket_timeout=1.0) as client:
                    replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER)
                    if not any(_replica_up(r, port) for r in replicas):
                        return False
            return True

        wait_for(synced, timeout, f"node {port} a synced replica the Sentinels know")

    def kill_sentinel(self, index: int) -> None:
        proc = self.sentinels[index]
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def restart_sentinel(self, index: int, timeout: float = 30.0) -> None:
        """Start the killed Sentinel ``index`` again; returns once it knows the current primary,
        a replica and another Sentinel."""
        port = self.sentinel_ports[index]
        self.sentinels[index] = self._start_sentinel(port)

        def watching() -> bool:
            with redis.Redis(HOST, port, socket_timeout=1.0) as client:
                _, primary = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                return (
                    int(primary) == self.primary_port()
                    and bool(client.execute_command("SENTINEL", "REPLICAS", MASTER))
                    and len(client.execute_command("SENTINEL", "SENTINELS", MASTER)) >= 1
                )

        wait_for(watching, timeout, f"sentinel {port} watching the primary again")

    def save_logs(self, dest: Path) -> None:
        """Copy each Sentinel's log to ``dest/sentinel-<port>.log``: the failovers they made
        (``+sdown``, ``+odown``, ``+switch-master``, ``+convert-to-slave``) and when."""
        for port in self.sentinel_ports:
            log = Path(self.root) / f"sentinel-{port}" / "sentinel.log"
            if log.exists():
                shutil.copyfile(log, dest / f"sentinel-{port}.log")

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.replica.stop()
        self.primary.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _replica_up(entry: Any, port: int) -> bool:
    """Whether one ``SENTINEL REPLICAS`` entry (a dict, or a flat field/value list) is the
    replica on ``port``, with no down flag and its link to the primary up."""
    flat = (
        list(entry.items())
        if isinstance(entry, dict)
        else list(zip(entry[::2], entry[1::2], strict=True))
    )
    fields = {reply_text(k): reply_text(v) for k, v in flat}
    return (
        fields.get("port") == str(port)
        and "down" not in fields.get("flags", "")
        and fields.get("master-link-status") == "ok"
    )
