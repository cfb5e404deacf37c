"""Reconnect delays: full jitter over an exponential bound, never giving up."""

from __future__ import annotations

import random
from collections.abc import Callable


def reconnect_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    server_retry_ms: int | None = None,
    rand: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait before reconnect number ``attempt`` (0 for the first after a failure).

    Full jitter (uniform over ``[0, min(cap, base * 2**attempt)]``) spreads a fleet's reconnects
    after a shared outage. An upstream's ``retry:`` is honoured as a floor, still bounded by
    ``cap`` so one upstream cannot park a reader for hours.
    """
    bound = min(cap, base * 2 ** min(attempt, 62))
    delay = rand(0.0, bound)
    if server_retry_ms is not None:
        delay = max(delay, server_retry_ms / 1000.0)
    return min(delay, cap)
