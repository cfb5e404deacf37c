"""A stuck test is reported failed, by name, and the run goes on: it never hangs the suite.

Each case runs pytest on a small test file in a subprocess, with this project's teardown plugin
(``tests.teardown``) and pytest-timeout, and asserts on what pytest reports. The subprocess's
own deadline is what would catch a hang; the asserted figures are counts and names, not times.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from listenerpool.testing.harness.processes import ROOT

# Long enough for a loaded machine to start pytest, time out the stuck test and reap its tasks
# (the test's own timeout is 2 s and the reaper retries for at most 10 s).
HANG_DEADLINE = 120

STUCK = '''
import asyncio

import pytest


async def swallow_one_cancel() -> None:
    """Absorbs the first cancellation, as asyncio.wait_for does on Python 3.11 when the
    cancellation arrives just as the awaited call completes (redis-py sends this way)."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        pass
    await asyncio.sleep(3600)


@pytest.mark.timeout(2)
async def test_stuck_forever() -> None:
    asyncio.create_task(swallow_one_cancel(), name="swallows-one-cancel")
    await asyncio.Event().wait()


async def test_left_a_task_that_swallows_one_cancel() -> None:
    asyncio.create_task(swallow_one_cancel(), name="swallows-one-cancel")
    await asyncio.sleep(0)


def test_after_them_all() -> None:
    pass
'''

IMMORTAL = """
import asyncio


async def test_left_a_task_that_never_ends() -> None:
    async def immortal() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    asyncio.create_task(immortal(), name="immortal")
    await asyncio.sleep(0)


def test_never_reached() -> None:
    pass
"""

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
timeout = 60
"""


def run_pytest(
    tmp_path: Path, source: str, *args: str, ini: str = ""
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text(INI + ini)
    (tmp_path / "test_cases.py").write_text(textwrap.dedent(source))
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "tests.teardown", "-p", "no:cacheprovider"),
            *("-q", "--rootdir", str(tmp_path), str(tmp_path / "test_cases.py"), *args),
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=HANG_DEADLINE,
    )


def test_a_stuck_test_fails_by_name_and_the_run_goes_on(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, STUCK)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    # The timed-out test fails with its name; its left-over task is reaped, not waited on.
    assert "FAILED test_cases.py::test_stuck_forever" in out, out
    assert "Timeout" in out, out
    # A task that absorbs one cancellation is ended by the next one: that test passes.
    assert "1 failed, 2 passed in" in out, out


def test_a_teardown_that_cannot_end_stops_the_run_naming_the_test(tmp_path: Path) -> None:
    # A task that ignores every cancellation keeps the loop from closing: nothing in the
    # process can end it, so the watchdog reports the test and ends the run.
    result = run_pytest(tmp_path, IMMORTAL, "-v", ini="teardown_deadline = 15\n")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "teardown of test_cases.py::test_left_a_task_that_never_ends did not finish" in out
    assert "test_never_reached PASSED" not in out, out


def test_in_two_processes_a_teardown_that_cannot_end_fails_that_test_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    # How the suite runs (pytest-xdist): the watchdog ends the test process it runs in, which
    # reports that test failed by name, and the other process runs the rest.
    result = run_pytest(tmp_path, IMMORTAL, "-n", "2", ini="teardown_deadline = 15\n")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "teardown of test_cases.py::test_left_a_task_that_never_ends did not finish" in out
    assert "crashed while running 'test_cases.py::test_left_a_task_that_never_ends'" in out, out
    assert "FAILED test_cases.py::test_left_a_task_that_never_ends" in out, out
