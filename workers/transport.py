"""An httpx transport that gives every request a connection of its own.

httpx's pooled transport scans all of its connections on every request and every response
close. A worker holds thousands of long-lived streams that are never reused, so that scan made
each new stream cost time proportional to the streams already open. Streams here are never
pooled: each request opens one connection, and closing the response closes it.

Every connection is made through :class:`GuardedBackend`, which resolves the host itself,
checks each resolved address against the upstream allowlist and connects to that very address
(TLS still verifies the host name), so a name that re-resolves elsewhere between a check and
the connect (DNS rebinding) cannot slip through. Redirect hops are new requests, so they pass
the same check. The backend also bounds the time until the response head is complete: a
server that dribbles its head byte by byte would otherwise reset the read timeout forever.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import typing
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpcore
import httpx

from listenerpool.allowlist import Allowlist, check_address
from listenerpool.errors import UpstreamError, UpstreamNotAllowed


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks against ``allow`` and connects; one instance per request.

    Raises :class:`~listenerpool.errors.UpstreamNotAllowed` when no resolved address is
    allowed, and :class:`~listenerpool.errors.UpstreamError` (not permanent) when the response
    head is not complete by ``head_deadline`` (a :func:`time.monotonic` value).
    """

    def __init__(
        self,
        allow: Allowlist,
        head_deadline: float | None,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._allow = allow
        self._inner = inner or httpcore.AnyIOBackend()
        self.head_deadline = head_deadline
        self.head_timeout = (head_deadline - time.monotonic()) if head_deadline else None

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port, timeout)
        allowed: list[str] = []
        refusal: UpstreamNotAllowed | None = None
        for address in addresses:
            try:
                check_address(self._allow, host, ipaddress.ip_address(address))
            except UpstreamNotAllowed as exc:  # reported if no address is allowed
                refusal = exc
                continue
            allowed.append(address)
        if not allowed:
            assert refusal is not None
            raise refusal
        last: Exception | None = None
        for address in allowed:
            try:
                stream = await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
                continue
            return _HeadDeadlineStream(stream, self)
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not upstreams")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def _resolve(host: str, port: int, timeout: float | None) -> list[str]:
    """The host's addresses, in the resolver's order (an IP literal resolves to itself)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
    except OSError as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
    seen: dict[str, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]).split("%", 1)[0], None)
    return list(seen)


class _HeadDeadlineStream(httpcore.AsyncNetworkStream):
    """Reads end at the backend's head deadline until the transport clears it."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, backend: GuardedBackend) -> None:
        self._inner = inner
        self._backend = backend

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        deadline = self._backend.head_deadline
        if deadline is None:
            return await self._inner.read(max_bytes, timeout)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._too_slow()
        try:
            return await self._inner.read(
                max_bytes, remaining if timeout is None else min(timeout, remaining)
            )
        except httpcore.ReadTimeout:
            if time.monotonic() >= deadline:
                raise self._too_slow() from None
            raise

    def _too_slow(self) -> UpstreamError:
        return UpstreamError(
            f"upstream sent no complete response head within "
            f"{self._backend.head_timeout or 0:.3g}s",
            permanent=False,
        )

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _HeadDeadlineStream(tls, self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


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

    def __init__(self, ssl_context: Any, allow: Allowlist, head_timeout: float | None) -> None:
        self._ssl_context = ssl_context
        self._allow = allow
        self._head_timeout = head_timeout

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        deadline = None if self._head_timeout is None else time.monotonic() + self._head_timeout
        backend = GuardedBackend(self._allow, deadline)
        connection = httpcore.AsyncHTTPConnection(
            origin=request.url.origin,
            ssl_context=self._ssl_context,
            http1=True,
            http2=False,
            network_backend=backend,
        )
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await connection.aclose()
            raise
        backend.head_deadline = None  # the head is complete: the body has the idle timeout
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
    """httpx's transport (its exception mapping and response wrapping) without the pool.

    Connections go only to addresses ``allow`` accepts (default: the unrestricted allowlist,
    which still refuses link-local and metadata addresses); ``head_timeout`` bounds the time
    from the start of a request to its complete response head (None: no bound).
    """

    def __init__(
        self,
        *,
        verify: bool = True,
        trust_env: bool = True,
        allow: Allowlist | None = None,
        head_timeout: float | None = None,
    ) -> None:
        super().__init__(verify=verify, trust_env=trust_env, http1=True, http2=False)
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
        self._pool = _ConnectionPerRequest(  # type: ignore[assignment]
            ssl_context, allow or Allowlist(), head_timeout
        )
