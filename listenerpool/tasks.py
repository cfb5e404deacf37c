"""Stopping tasks reliably."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_until_done(task: asyncio.Task[Any], retry_after: float = 0.01) -> None:
    """Cancel ``task`` and wait for it to end.

    A cancellation that lands inside a deadline scope just as it expires can be absorbed as if
    it were the scope's own timeout (anyio's scopes under httpx; ``asyncio.timeout`` and
    ``wait_for`` on 3.11); cancelling again until the task is done makes stopping reliable.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=retry_after)
