"""A client command (`tail`, `status`, `cancel`) ends on SIGINT even when its code absorbs one
cancellation, as a read under httpx's timeouts can: under load `tail` ran on after Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from listenerpool.cli.commands import until_interrupted


async def test_a_command_that_absorbs_one_cancel_still_ends_on_sigint() -> None:
    started = asyncio.Event()

    async def stubborn() -> int:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # absorbed, as a deadline scope can
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)
        return 0

    running = asyncio.create_task(until_interrupted(stubborn()))
    await asyncio.wait_for(started.wait(), 10)  # the signal handlers are in place by now
    os.kill(os.getpid(), signal.SIGINT)
    assert await asyncio.wait_for(running, 10) == 130


async def test_a_command_that_ends_gives_its_own_status_and_errors() -> None:
    async def done() -> int:
        return 7

    async def failing() -> int:
        raise ValueError("bad input")

    assert await until_interrupted(done()) == 7
    with pytest.raises(ValueError, match="bad input"):
        await until_interrupted(failing())
