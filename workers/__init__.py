"""The listenerpool worker: a pool of upstream SSE readers on one asyncio loop."""

import listenerpool.rqprefix  # noqa: F401 - before anything imports rq
from workers.dispatch import listen
from workers.worker import StopReason, Worker

__all__ = ["StopReason", "Worker", "listen"]
