"""A printing command whose reader goes away (`listenerpool tail demo-1 | head -3`) stops quietly,
as Unix tools do: no traceback, exit status 128 + SIGPIPE."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import httpx
import pytest

from listenerpool.testing.pool import LocalPool
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import ROOT
from tests.test_quickstart import BIN

pytestmark = pytest.mark.timeout(60)
SIGPIPE_STATUS = 128 + signal.SIGPIPE


def listen(pool: LocalPool, upstream: SSEUpstream, sid: str) -> None:
    response = httpx.put(f"{pool.url}/v1/sessions/{sid}", json={"url": upstream.url(sid)})
    assert response.status_code == 201, response.text


def assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "BrokenPipe" not in stderr, stderr


def test_tail_stops_quietly_once_its_reader_has_gone(
    lp_pool: LocalPool, lp_upstream: SSEUpstream
) -> None:
    listen(lp_pool, lp_upstream, "piped")
    lp_upstream.send("piped", "first", id="1")
    proc = subprocess.Popen(
        [str(BIN / "listenerpool"), "tail", "piped", "--gateway", lp_pool.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"1\t")
        proc.stdout.close()  # what `head -1` does once it has its line
        # tail notices only when it next writes: feed it events until it has exited.
        deadline = time.monotonic() + 30
        seq = 1
        while proc.poll() is None:
            assert time.monotonic() < deadline, "tail still runs with nobody reading"
            seq += 1
            lp_upstream.send("piped", f"event {seq}", id=str(seq))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
        assert proc.returncode == SIGPIPE_STATUS
        assert_quiet(proc.stderr.read().decode())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "command",
    [
        ["status", "--interval", "0.1", "--gateway", "{gateway}"],
        ["cancel", "gone", "--gateway", "{gateway}"],
    ],
    ids=["status", "cancel"],
)
def test_a_command_printing_into_a_closed_pipe_exits_quietly(
    lp_pool: LocalPool, lp_upstream: SSEUpstream, command: list[str]
) -> None:
    listen(lp_pool, lp_upstream, "gone")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything
    try:
        result = subprocess.run(
            [str(BIN / "listenerpool"), *(arg.format(gateway=lp_pool.url) for arg in command)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == SIGPIPE_STATUS, result.stderr
    assert_quiet(result.stderr)
