"""The gateway keeps an idle HTTP/1.1 connection open for longer than clients keep theirs
(LP_KEEP_ALIVE, 75 s): a server that closes an idle connection just as a client sends a request
on it fails that request with a reset. httpx's pooled connections expire after 5 s, uvicorn's
default keep-alive, and 1000 PUTs on a busy machine hit that race."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import fast_settings
from tests.gateway.served import gateway

pytestmark = pytest.mark.timeout(60)

IDLE = 6.0  # longer than uvicorn's default keep-alive and httpx's pool expiry (5 s)


async def healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One request on the open connection; its status, with the whole response read."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = next(
            int(line.split(":", 1)[1])
            for line in head.split("\r\n")
            if line.lower().startswith("content-length:")
        )
        await reader.readexactly(length)
    return int(head.split(" ", 2)[1])


async def test_an_idle_connection_still_serves_a_request_after_the_clients_expiry(
    fake_redis: Any, fake_sync_redis: Any
) -> None:
    settings = fast_settings(redis_url="redis://unused")
    assert settings.keep_alive > IDLE
    async with gateway(settings, fake_redis, fake_sync_redis) as address:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            assert await healthz(reader, writer) == 200
            await asyncio.sleep(IDLE)  # the connection idles: the very thing under test
            assert await healthz(reader, writer) == 200
        finally:
            writer.close()
