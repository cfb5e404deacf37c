"""The listenerpool worker: a pool of upstream SSE readers on one asyncio loop."""

from workers.dispatch import listen
from workers.worker import StopReason, Worker

__all__ = ["StopReason", "Worker", "listen"]
