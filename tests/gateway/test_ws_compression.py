"""permessage-deflate is the operator's choice (LP_WS_COMPRESSION), off unless set: a browser
offers it on every WebSocket, and compressing every frame for every client costs the gateway
CPU and memory per connection (bench/README.md, fan-out)."""

from __future__ import annotations

from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.conftest import fast_settings
from tests.gateway.served import gateway

pytestmark = pytest.mark.timeout(30)


async def negotiated(address: str) -> str | None:
    """The extensions the gateway accepted for a client offering permessage-deflate."""
    async with connect(f"ws://{address}/v1/stream", compression="deflate", open_timeout=10) as ws:
        assert ws.response is not None
        return ws.response.headers.get("Sec-WebSocket-Extensions")


async def test_websocket_compression_is_off_unless_enabled(
    fake_redis: Any, fake_sync_redis: Any
) -> None:
    settings = fast_settings(redis_url="redis://unused")
    assert settings.ws_compression is False
    async with gateway(settings, fake_redis, fake_sync_redis) as address:
        assert await negotiated(address) is None


async def test_lp_ws_compression_turns_permessage_deflate_on(
    fake_redis: Any, fake_sync_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LP_WS_COMPRESSION", "true")
    settings = fast_settings(redis_url="redis://unused")
    async with gateway(settings, fake_redis, fake_sync_redis) as address:
        extensions = await negotiated(address)
    assert extensions is not None and extensions.startswith("permessage-deflate")
