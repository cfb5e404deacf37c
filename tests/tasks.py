"""Ending a test's tasks and saying where the ones that would not end are."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from listenerpool.tasks import cancel_until_done


def task_stack(task: asyncio.Task[Any]) -> str:
    """Walk the await chain, including async generators, which ``print_stack`` stops at."""
    lines = []
    obj: Any = task.get_coro()
    while obj is not None:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        nxt = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None)
        if nxt is None:
            lines.append(f"  awaiting {obj!r:.200}")
        obj = nxt
    return "\n".join(lines)


async def finish_tasks(tasks: set[asyncio.Task[Any]], deadline: float) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` until they are done or ``deadline`` (monotonic) passes; the survivors."""
    pending = {t for t in tasks if not t.done()}
    if not pending:
        return set()
    stopping = asyncio.gather(*(cancel_until_done(t) for t in pending))
    remaining = max(0.0, deadline - time.monotonic())
    done, _ = await asyncio.wait([stopping], timeout=remaining)
    if not done:
        stopping.cancel()
    return {t for t in pending if not t.done()}
