"""The listenerpool gateway: control API and fan-out of session events to WS/SSE clients."""

import listenerpool.rqprefix  # noqa: F401 - before anything imports rq
from gateway.app import create_app, gateway_lifespan

__all__ = ["create_app", "gateway_lifespan"]
