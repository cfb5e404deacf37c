"""A worker raises its soft limit of open files to the hard one, and takes no more sessions
than it can open sockets for, saying so when that is less than LP_WORKER_CAPACITY."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import redis

from listenerpool import keys
from listenerpool.testing.redis_server import RedisServer
from tests.conftest import ROOT
from workers.open_files import RESERVED_FILES, capacity_within

pytestmark = pytest.mark.timeout(60)
DEADLINE = 20.0  # s: a worker process starting and sending its first heartbeat, on a loaded machine


def limited_to(soft: int, hard: int) -> Callable[[], None]:
    """A child's pre-exec hook that sets its limits of open files."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def test_the_capacity_is_what_the_open_files_allow_besides_the_reserved_ones() -> None:
    assert capacity_within(10_000, 20_000) == 10_000
    assert capacity_within(10_000, 10_000 + RESERVED_FILES) == 10_000
    assert capacity_within(10_000, 10_000 + RESERVED_FILES - 1) == 9_999
    assert capacity_within(10_000, 1_024) == 1_024 - RESERVED_FILES
    assert capacity_within(10_000, resource.RLIM_INFINITY) == 10_000
    assert capacity_within(10_000, RESERVED_FILES) == 1, "a worker takes one session at least"


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2 * RESERVED_FILES:
        pytest.skip(f"needs a finite hard limit of open files above {2 * RESERVED_FILES}")
    script = (
        "import resource\n"
        "from workers.open_files import raise_soft_limit\n"
        "print(*raise_soft_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        preexec_fn=limited_to(RESERVED_FILES, hard),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(hard)] * 4


def test_a_worker_that_cannot_open_its_capacity_takes_fewer_sessions_and_says_so(
    redis_server: RedisServer,
) -> None:
    open_files = RESERVED_FILES + 100
    env = {"PATH": "/usr/bin:/bin", "LP_REDIS_URL": redis_server.url, "LP_WORKER_CAPACITY": "5000"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers"],
        cwd=ROOT,
        env=env,
        preexec_fn=limited_to(open_files, open_files),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        deadline = time.monotonic() + DEADLINE
        capacities: list[str] = []
        while not capacities:
            assert worker.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "no heartbeat from the worker"
            capacities = [
                client.hget(keys.worker_key(w), "capacity") or ""
                for w in client.zrange(keys.WORKERS, 0, -1)
            ]
            time.sleep(0.05)  # the poll interval
        assert capacities == ["100"], "the heartbeat announces the capacity it can honour"
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            _, stderr = worker.communicate(timeout=DEADLINE)
        finally:
            worker.kill()
        client.close()
    assert worker.returncode == 0, stderr
    warning = next(line for line in stderr.splitlines() if "LP_WORKER_CAPACITY=5000" in line)
    assert f"may open {open_files}" in warning and "taking at most 100 sessions" in warning
