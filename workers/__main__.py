"""``python -m workers``: run one worker process against the pool's Redis."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from listenerpool.connections import async_redis, listen_queue, sync_redis
from listenerpool.errors import ListenerPoolError
from listenerpool.settings import Settings, load_settings
from workers.worker import Worker

# Flags mirror the LP_* settings they override.
FLAGS: dict[str, tuple[str, type]] = {
    "--redis-url": ("redis_url", str),
    "--worker-id": ("worker_id", str),
    "--capacity": ("worker_capacity", int),
    "--lease-ttl": ("lease_ttl", float),
    "--idle-timeout": ("idle_timeout", float),
    "--log-level": ("log_level", str),
}


def parse_args(argv: Sequence[str] | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        prog="python -m workers",
        description="Run a listenerpool worker: takes listen jobs from Redis and holds the "
        "upstream SSE readers. Every flag overrides the LP_* environment setting of the same "
        "name (e.g. --lease-ttl overrides LP_LEASE_TTL).",
    )
    for flag, (name, kind) in FLAGS.items():
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"LP_{name.upper()}")
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


async def serve(settings: Settings) -> None:
    redis = async_redis(settings)
    sync = sync_redis(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop)
    try:
        worker = Worker(settings, redis=redis, queue=listen_queue(sync, settings))
        await worker.run(stop)
    finally:
        await redis.aclose()
        sync.close()


def _on_signal(stop: asyncio.Event) -> None:
    if stop.is_set():
        # A second signal while draining: the operator wants out now.
        logging.getLogger(__name__).warning("second signal: exiting without finishing the drain")
        raise SystemExit(1)
    stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    overrides = parse_args(argv)
    try:
        settings = load_settings(**overrides)
        if not settings.redis_url:
            raise ListenerPoolError("LP_REDIS_URL (or --redis-url) is required for a worker")
    except ListenerPoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
