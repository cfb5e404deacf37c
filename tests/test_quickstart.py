"""The README's first command's target, `listenerpool demo`, run as a user would: a session is
started over HTTP, read with the Python client, inspected with `status` and `tail`, and the whole
thing stops on one Ctrl-C leaving no process behind. Both embedded Redis variants."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from listenerpool.client import Event, PoolClient
from listenerpool.testing.redis_server import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(90)
BIN = Path(sys.executable).parent


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        match = re.search(pattern, text)
        if match:
            return match.group(0)
        if proc.poll() is not None:
            raise AssertionError(f"demo exited with {proc.returncode}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in the output:\n{path.read_text()}")


def start_demo(port: int, env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as sink:
        return subprocess.Popen(
            [str(BIN / "listenerpool"), "demo", "--port", str(port), "--sessions", "2"],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip


def tail_lines(sid: str, base: str, count: int) -> list[str]:
    """The first lines `listenerpool tail` prints, then it is stopped."""
    proc = subprocess.Popen(
        [str(BIN / "listenerpool"), "tail", sid, "--gateway", base],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        return [proc.stdout.readline().rstrip("\n") for _ in range(count)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "listenerpool"), *args], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


@pytest.mark.parametrize("variant", ["redis-server", "fakeredis"])
async def test_demo_runs_serves_and_stops_on_ctrl_c(tmp_path: Path, variant: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LP_")}
    if variant == "fakeredis":
        env["PATH"] = str(BIN)  # no redis-server on PATH: the in-process fakeredis is used
    port = free_port()
    out = tmp_path / "demo.out"
    proc = start_demo(port, env, out)
    base = f"http://127.0.0.1:{port}"
    try:
        announced = wait_for_line(out, r"embedded Redis: [^\n]*", proc, 30)
        assert ("child redis-server" if variant == "redis-server" else "fakeredis") in announced
        upstream = wait_for_line(out, r"demo upstream http://127\.0\.0\.1:\d+", proc, 30)
        upstream_url = upstream.split(" ", 2)[-1]
        children = psutil.Process(proc.pid).children(recursive=True)

        async with httpx.AsyncClient(base_url=base) as http:
            created = await http.put(
                "/v1/sessions/mine", json={"url": f"{upstream_url}/events/mine"}
            )
            assert created.status_code == 201
        async with PoolClient(base) as client:
            events = []
            async for item in client.events("mine"):
                assert isinstance(item, Event)
                events.append(item)
                if len(events) == 5:
                    break
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
        assert events[0].event == "RUN_STARTED"

        status = cli("status", "--gateway", base, "--interval", "0.5")
        assert status.returncode == 0, status.stderr
        assert re.search(r"mine\s+listening", status.stdout)
        assert re.search(r"demo-1\s+listening", status.stdout)
        assert [line.split("\t")[0] for line in tail_lines("demo-1", base, 3)] == ["1", "2", "3"]
        cancelled = cli("cancel", "mine", "--gateway", base)
        assert (cancelled.returncode, cancelled.stdout.strip()) == (0, "cancelled mine")
        unknown = cli("cancel", "nobody", "--gateway", base)
        assert unknown.returncode == 1 and "unknown_session" in unknown.stderr

        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, out.read_text()
        # The embedded Redis started empty: nothing was lost, and nothing says otherwise.
        warnings = [line for line in out.read_text().splitlines() if " WARNING " in line]
        assert [w for w in warnings if "LP_API_TOKEN is not set" not in w] == [], warnings
        gone = psutil.wait_procs(children, timeout=10)[1]
        assert gone == [], f"left behind: {gone}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_command_has_help_and_bad_input_is_one_line() -> None:
    for command in ("up", "gateway", "worker", "upstream-demo", "demo", "status", "tail", "cancel"):
        result = cli(command, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, command
    bad_flag = cli("up", "--lease-ttl", "soon")
    assert bad_flag.returncode == 2 and "--lease-ttl" in bad_flag.stderr
    env = {**os.environ, "LP_LEASE_TTL": "-3"}
    bad_setting = subprocess.run(
        [str(BIN / "listenerpool"), "up"], capture_output=True, text=True, timeout=30, env=env
    )
    assert bad_setting.returncode == 2
    assert bad_setting.stderr.strip().startswith("error: invalid settings: LP_LEASE_TTL")
    assert len(bad_setting.stderr.strip().splitlines()) == 1
    no_redis = cli("worker")
    assert no_redis.returncode == 2 and "LP_REDIS_URL" in no_redis.stderr
    unreachable = cli("status", "--gateway", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1 and "cannot reach the gateway" in unreachable.stderr
