"""Request rate limits on the control API: a token bucket per caller, per gateway process.

The caller is the ``Authorization`` header (hashed, so no token is kept in memory in clear)
or, without one, the client address. Event streams, health, readiness and the schema are not
limited. A refused request gets 429 JSON with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_response

LIMITED_PREFIXES = ("/v1/sessions", "/v1/workers", "/v1/subscribe-token")
MAX_CALLERS = 10_000  # buckets kept; the least recently seen goes first beyond this


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; pure (the caller passes the time)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """Token buckets by caller key, at most ``max_callers`` of them."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_callers: int = MAX_CALLERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._max = max_callers
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str) -> float:
        """0.0 when ``key`` may make a request now, else the seconds it must wait."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self._max:
                # A forgotten caller starts again with a full bucket: evict the least recent.
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


def caller_key(scope: Scope) -> str:
    """``auth:<sha256 of the Authorization value>``, else ``addr:<client host>``."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return "auth:" + hashlib.sha256(value).hexdigest()
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


def is_limited(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.startswith(LIMITED_PREFIXES) and not path.endswith("/events")


class RateLimit:
    """ASGI middleware applying a :class:`RateLimiter` to control API requests."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_limited(scope):
            wait = self.limiter.take(caller_key(scope))
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                refusal = error_response(
                    429,
                    "rate_limited",
                    f"over {self.limiter.rate:g} requests/s (burst {self.limiter.burst}); "
                    f"retry in {seconds}s",
                    **{"Retry-After": str(seconds)},
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
