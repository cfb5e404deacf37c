"""A listening command started on a port already taken refuses in one line before it starts or
sends anything, and whatever way `listenerpool demo` ends, its embedded redis-server goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from listenerpool.cli import launch
from listenerpool.cli.embedded import EmbeddedRedis
from listenerpool.settings import load_settings
from listenerpool.testing.loopthread import wait_until
from listenerpool.testing.redis_server import free_port
from tests.conftest import ROOT
from tests.test_quickstart import BIN, start_demo, wait_for_line

pytestmark = pytest.mark.timeout(90)
NO_REDIS = "redis://127.0.0.1:1/0"  # never contacted: the port check comes first


@contextlib.contextmanager
def occupied_port() -> Iterator[socket.socket]:
    """A listening socket that nothing is expected to connect to."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def assert_nothing_connected(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.accept()


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LP_")}


@pytest.mark.parametrize(
    ("command", "flag", "extra"),
    [
        ("demo", "--port", []),
        ("demo", "--upstream-port", ["--port", str(free_port())]),  # not 8080: may be in use
        ("up", "--port", []),
        ("gateway", "--port", ["--redis-url", NO_REDIS]),
        ("worker", "--metrics-port", ["--redis-url", NO_REDIS]),
        ("upstream-demo", "--port", []),
    ],
)
def test_a_taken_port_is_one_line_and_nothing_starts(
    command: str, flag: str, extra: list[str]
) -> None:
    with occupied_port() as sock:
        port = sock.getsockname()[1]
        result = subprocess.run(
            [str(BIN / "listenerpool"), command, flag, str(port), *extra],
            capture_output=True, text=True, timeout=30, env=clean_env(), cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 3, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: port {port} (")
        assert "already in use" in line and f"choose another with {flag}" in line
        assert result.stdout == ""  # not even the embedded Redis was announced
        assert_nothing_connected(sock)


def test_two_listeners_on_one_port_are_named_together() -> None:
    port = free_port()
    result = subprocess.run(
        [str(BIN / "listenerpool"), "demo", "--port", str(port), "--upstream-port", str(port)],
        capture_output=True, text=True, timeout=30, env=clean_env(), cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 3
    assert result.stderr.startswith(
        f"error: port {port} is asked for both the gateway and the demo upstream; "
    )
    assert len(result.stderr.splitlines()) == 1


async def test_a_gateway_that_cannot_listen_stops_the_worker_too() -> None:
    """The port taken between the check and the bind: the pool stops whole, with the reason,
    instead of running a worker without a gateway."""
    with occupied_port() as sock, EmbeddedRedis(prefer="fakeredis") as redis:
        port = sock.getsockname()[1]
        settings = load_settings(
            redis_url=redis.url, host="127.0.0.1", port=port, log_level="WARNING"
        )
        with pytest.raises(launch.StartupError, match=f"port {port} .* already in use"):
            await asyncio.wait_for(launch.serve_up(settings, asyncio.Event()), 30)
        assert_nothing_connected(sock)


async def test_a_metrics_port_taken_after_the_check_is_named() -> None:
    with occupied_port() as sock, EmbeddedRedis(prefer="fakeredis") as redis:
        port = sock.getsockname()[1]
        settings = load_settings(
            redis_url=redis.url, host="127.0.0.1", metrics_port=port, log_level="WARNING"
        )
        with pytest.raises(launch.StartupError, match=f"port {port} .*--metrics-port"):
            await asyncio.wait_for(launch.serve_worker(settings, asyncio.Event()), 30)


async def test_the_demo_sends_no_session_to_a_port_it_could_not_take() -> None:
    with occupied_port() as sock, EmbeddedRedis(prefer="fakeredis") as redis:
        port = sock.getsockname()[1]
        settings = load_settings(
            redis_url=redis.url, host="127.0.0.1", port=port, log_level="WARNING"
        )
        demo = launch.serve_demo(settings, asyncio.Event(), sessions=3, upstream_port=0)
        with pytest.raises(launch.StartupError, match=f"port {port}"):
            await asyncio.wait_for(demo, 30)
        assert_nothing_connected(sock)


def ended(process: psutil.Process) -> bool:
    """Gone, or a zombie: dead, waiting for whichever process adopted it to reap it."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def redis_children(pid: int) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(pid).children(recursive=True)
        if child.name() == "redis-server"
    ]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "SIGTERM while starting"])
def test_the_embedded_redis_server_ends_with_the_demo(tmp_path: Path, how: str) -> None:
    out = tmp_path / "demo.out"
    proc = start_demo(free_port(), clean_env(), out)
    try:
        if how == "SIGTERM while starting":
            wait_for_line(out, r"embedded Redis: a child redis-server", proc, 30)
        else:
            wait_for_line(out, r"Ctrl-C stops everything", proc, 30)
        [redis] = redis_children(proc.pid)
        if how == "SIGKILL":
            proc.kill()  # no unwinding at all: the kernel ends the child
            assert proc.wait(20) == -signal.SIGKILL
        else:
            proc.send_signal(signal.SIGTERM)
            # A graceful drain once the loop handles signals; before that, unwinding.
            assert proc.wait(30) in (0, 128 + signal.SIGTERM), out.read_text()
        wait_until(lambda: ended(redis), 10, f"redis-server {redis.pid} outlived the demo")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
