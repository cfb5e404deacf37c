"""``python -m gateway``: serve the gateway with uvicorn (websockets implementation)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn

from gateway.app import create_app
from listenerpool.errors import ListenerPoolError
from listenerpool.settings import load_settings

FLAGS: dict[str, tuple[str, type]] = {
    "--redis-url": ("redis_url", str),
    "--host": ("host", str),
    "--port": ("port", int),
    "--log-level": ("log_level", str),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Run a listenerpool gateway: the control API and event fan-out. Every flag "
        "overrides the LP_* environment setting of the same name.",
    )
    for flag, (name, kind) in FLAGS.items():
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"LP_{name.upper()}")
    overrides = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        settings = load_settings(**overrides)
        if not settings.redis_url:
            raise ListenerPoolError("LP_REDIS_URL (or --redis-url) is required for a gateway")
    except ListenerPoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        ws_ping_interval=settings.client_heartbeat,
        ws_ping_timeout=settings.client_heartbeat,
        log_level=settings.log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
