"""An httpx transport that gives every request a connection of its own.

httpx's pooled transport scans all of its connections on every request and every response
close. A worker holds thousands of long-lived streams that are never reused, so that scan made
each new stream cost time proportional to the streams already open. Streams here are never
pooled: each request opens one connection, and closing the response closes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpcore
import httpx


class _ClosingStream:
    """A response body that closes its connection when the body is closed."""

    def __init__(self, stream: Any, connection: httpcore.AsyncHTTPConnection) -> None:
        self._stream = stream
        self._connection = connection

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        try:
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()
        finally:
            await self._connection.aclose()


class _ConnectionPerRequest:
    """Stands where httpx's transport keeps its httpcore pool (same request interface)."""

    def __init__(self, ssl_context: Any) -> None:
        self._ssl_context = ssl_context

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        connection = httpcore.AsyncHTTPConnection(
            origin=request.url.origin, ssl_context=self._ssl_context, http1=True, http2=False
        )
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await connection.aclose()
            raise
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_ClosingStream(response.stream, connection),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Nothing is pooled: every connection closes with its response."""

    async def __aenter__(self) -> _ConnectionPerRequest:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        await self.aclose()


class StreamTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (its exception mapping and response wrapping) without the pool."""

    def __init__(self, *, verify: bool = True, trust_env: bool = True) -> None:
        super().__init__(verify=verify, trust_env=trust_env, http1=True, http2=False)
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
        self._pool = _ConnectionPerRequest(ssl_context)  # type: ignore[assignment]
