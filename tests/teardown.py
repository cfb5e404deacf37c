"""Bounded teardown: a test that fails or times out is reported with its name and the run goes
on, instead of hanging in teardown.

Two ways a teardown hangs, and what this plugin does about each:

- A task the test left running survives its cancellation. pytest-asyncio closes a test's loop
  by cancelling every task once and waiting for all of them, so one task that absorbs that
  single cancellation hangs the run. On Python 3.11 any task can absorb one: ``asyncio.wait_for``
  (redis-py wraps every command's send in it) returns the result instead of raising when the
  cancellation arrives as the awaited call completes. :func:`reap_tasks` cancels what is left
  until it is done, and fails the test naming the tasks that outlive a deadline.
- Teardown blocks in code that no cancellation reaches (a thread join, a blocking call).
  pytest-timeout's timer covers a test's setup, call and teardown together and is spent once
  it fired in the call, so :func:`pytest_runtest_teardown` arms a watchdog of its own: it prints
  the test's name and every thread's stack, then ends the test process with a failure: in a
  one-process run that ends the run; under pytest-xdist, which the suite uses, the test is
  reported as failed (its process "crashed") and the other process runs the rest.
"""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Generator

import pytest

from tests.tasks import finish_tasks, task_stack

#: How long left-over tasks are cancelled again and again before the test fails naming them.
REAP_DEADLINE = 10.0
#: How long a test's teardown may take before the watchdog ends the run.
TEARDOWN_DEADLINE = 120.0


@pytest.fixture(autouse=True)
def bounded_task_teardown(request: pytest.FixtureRequest) -> None:
    """Reaps the tasks of every ``async def`` test. Sync tests run no loop of pytest-asyncio's
    (and some run a loop of their own, Playwright's, on which a fixture's loop cannot run)."""
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        # Requested first, so it is torn down last: after the test's other fixtures.
        request.getfixturevalue("reap_tasks")


@pytest.fixture
async def reap_tasks() -> AsyncIterator[None]:
    """After the test (and its other fixtures' teardown): no task of the test's loop is left."""
    yield
    me = asyncio.current_task()
    left = {t for t in asyncio.all_tasks() if t is not me}
    survivors = await finish_tasks(left, time.monotonic() + REAP_DEADLINE)
    if survivors:
        stacks = "\n".join(f"{t.get_name()}:\n{task_stack(t)}" for t in survivors)
        pytest.fail(
            f"{len(survivors)} task(s) outlived {REAP_DEADLINE:.0f} s of cancellation:\n{stacks}",
            pytrace=False,
        )


WATCHDOG = pytest.StashKey["TeardownWatchdog"]()


def _end_the_run(config: pytest.Config, nodeid: str, deadline: float) -> None:
    # Output capture would swallow what a process that exits this way prints.
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=False)
    sys.stderr.write(f"\n\nteardown of {nodeid} did not finish within {deadline:.0f} s; stacks:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(1)


class TeardownWatchdog:
    """One thread for the whole run, armed during each teardown. One thread, started before
    any test, rather than a timer per teardown: tests that compare the threads alive before
    and after them must not see the watchdog come and go."""

    def __init__(self, config: pytest.Config, seconds: float) -> None:
        self._config = config
        self._seconds = seconds
        self._armed: tuple[str, float] | None = None  # (nodeid, monotonic deadline)
        self._changed = threading.Condition()
        threading.Thread(target=self._watch, name="teardown-watchdog", daemon=True).start()

    def arm(self, nodeid: str) -> None:
        with self._changed:
            self._armed = (nodeid, time.monotonic() + self._seconds)
            self._changed.notify()

    def disarm(self) -> None:
        with self._changed:
            self._armed = None
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while True:
                if self._armed is None:
                    self._changed.wait()
                    continue
                nodeid, deadline = self._armed
                left = deadline - time.monotonic()
                if left <= 0:
                    _end_the_run(self._config, nodeid, self._seconds)
                self._changed.wait(left)


def pytest_configure(config: pytest.Config) -> None:
    seconds = float(config.getini("teardown_deadline") or TEARDOWN_DEADLINE)
    config.stash[WATCHDOG] = TeardownWatchdog(config, seconds)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    watchdog = item.config.stash[WATCHDOG]
    watchdog.arm(item.nodeid)
    try:
        return (yield)
    finally:
        watchdog.disarm()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "teardown_deadline",
        f"seconds a test's teardown may take before the run ends (default {TEARDOWN_DEADLINE})",
    )
