"""Opening a session's upstream stream: checked addresses, TLS, the GET, its redirects.

One :class:`UpstreamClient` serves every reader of a worker; it keeps no connection. Each
request resolves the host, connects to an address the allowlist accepts (see
``workers/addresses.py``), sends one HTTP/1.1 GET over an :class:`~workers.http1.Http1Protocol`
and waits for the response head. Redirects (301, 302, 303, 307, 308 with a ``Location``) are
followed up to ``max_redirects`` times, each hop a new checked connection, with the header rules
browsers and HTTP clients share: ``Authorization`` only within the origin (or its upgrade from
http to https on the default ports), ``Cookie`` never carried over.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urljoin, urlsplit

import certifi
import h11

from listenerpool.allowlist import Allowlist
from listenerpool.logs import redact_url
from listenerpool.metrics import ReconnectReason
from listenerpool.settings import Settings
from workers.addresses import ResolveError, allowed_addresses, resolve
from workers.http1 import Http1Protocol, UpstreamBroken

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "listenerpool"
# Characters left as they are in a request target; anything else (spaces, non-ASCII) is
# percent-encoded, as a browser would before sending.
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"

Headers = dict[str, tuple[str, str]]  # lower-case name -> (name as given, value)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: ``host`` as the allowlist and TLS see it (lower case, ASCII,
    IPv6 without brackets), ``authority`` as the ``Host`` header says it."""

    url: str
    scheme: str
    host: str
    port: int
    authority: str
    path: str  # the request target: path and query

    @classmethod
    def parse(cls, url: str) -> Target:
        try:
            parts = urlsplit(url)
            port = parts.port
            host = parts.hostname or ""
            if not host.isascii():
                host = host.encode("idna").decode("ascii")
        except (ValueError, UnicodeError) as exc:
            raise _unusable(url, str(exc)) from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise _unusable(url, "not http or https")
        if not host:
            raise _unusable(url, "no host")
        port = port or DEFAULT_PORTS[scheme]
        authority = f"[{host}]" if ":" in host else host
        if port != DEFAULT_PORTS[scheme]:
            authority += f":{port}"
        path = quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            path += "?" + quote(parts.query, safe=_QUERY_SAFE)
        return cls(url, scheme, host, port, authority, path)

    def same_origin(self, other: Target) -> bool:
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port)

    def upgraded_to(self, other: Target) -> bool:
        """``other`` is this http origin on https, both on their default ports."""
        upgrade = (self.scheme, self.port, other.scheme, other.port) == ("http", 80, "https", 443)
        return upgrade and self.host == other.host


def tls_context() -> ssl.SSLContext:
    """Certificates checked against ``SSL_CERT_FILE``, ``SSL_CERT_DIR`` or the certifi bundle
    (in that order, as before this client), host names checked; HTTP/1.1 offered by ALPN."""
    if os.environ.get("SSL_CERT_FILE"):
        context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    elif os.environ.get("SSL_CERT_DIR"):
        context = ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    else:
        context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpstreamClient:
    """Opens upstream event streams for the readers of one worker.

    ``connect_timeout`` bounds resolving and each address's connect and TLS handshake;
    ``head_timeout`` the time from a request's start to its complete response head (each
    redirect hop is a request); ``idle_timeout`` the silence on an open connection. At most
    ``connect_concurrency`` connections (None: any number) are being resolved, connected and
    handshaken at once; the others wait their turn.
    """

    def __init__(
        self,
        *,
        allow: Allowlist | None = None,
        connect_timeout: float,
        head_timeout: float | None,
        idle_timeout: float,
        max_redirects: int,
        ssl_context: ssl.SSLContext | None = None,
        connect_concurrency: int | None = None,
    ) -> None:
        self._allow = allow or Allowlist()
        self._connect_timeout = connect_timeout
        self._head_timeout = head_timeout
        self._idle_timeout = idle_timeout
        self._max_redirects = max_redirects
        self._ssl_context = ssl_context
        # Opening thousands of connections at once (a worker taking sessions over) would leave
        # its loop no time for the lease renewals of the readers already listening. The
        # response head is awaited outside: an upstream slow to send it holds no slot.
        self._connect_slots = (
            asyncio.Semaphore(connect_concurrency) if connect_concurrency is not None else None
        )
        # The streams' timers share one empty context (they log nothing): a worker's streams
        # all run on its one loop, so it is never entered twice at once.
        self._timer_context = contextvars.Context()

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamClient:
        return cls(
            allow=settings.allowlist,
            connect_timeout=settings.connect_timeout,
            head_timeout=settings.head_timeout,
            idle_timeout=settings.idle_timeout,
            max_redirects=settings.max_redirects,
            connect_concurrency=settings.connect_concurrency,
        )

    async def open(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        before_connect: Callable[[], None] | None = None,
    ) -> Http1Protocol:
        """GET ``url`` with ``headers``; the stream returned has its head (any status; a
        redirect only when redirects are not followed). The caller aborts it when done.
        ``before_connect`` is called right before each connection attempt (every address,
        every redirect hop) and again right before its request is written, nothing awaited in
        between: what it raises stops the attempt (a connection made is closed unused, so a
        process frozen while it connected sends nothing its lease no longer covers).

        Raises :class:`~workers.http1.UpstreamBroken` (connect, timeout, protocol, too many
        redirects), :class:`~listenerpool.errors.UpstreamError` (head deadline) and
        :class:`~listenerpool.errors.UpstreamNotAllowed` (no allowed address, any hop).
        """
        target = Target.parse(url)
        sent = request_headers(target, headers)
        hops = 0
        while True:
            stream = await self._exchange(target, sent, before_connect)
            head = await stream.head()
            location = head.headers.get("location")
            if (
                self._max_redirects == 0
                or head.status_code not in REDIRECT_STATUSES
                or location is None
            ):
                return stream
            stream.abort()  # a redirect's body is of no use
            following = Target.parse(urljoin(target.url, location.strip()))
            hops += 1
            if hops > self._max_redirects:
                raise UpstreamBroken(
                    f"upstream redirected more than LP_MAX_REDIRECTS={self._max_redirects} times",
                    ReconnectReason.PROTOCOL_ERROR,
                )
            sent = redirect_headers(target, following, sent)
            target = following

    async def _exchange(
        self, target: Target, headers: Headers, before_connect: Callable[[], None] | None
    ) -> Http1Protocol:
        loop = asyncio.get_running_loop()
        deadline = None if self._head_timeout is None else loop.time() + self._head_timeout
        try:
            request = h11.Request(
                method="GET",
                target=target.path,
                headers=[(n.encode(), v.encode()) for n, v in headers.values()],
            )
        except h11.LocalProtocolError as exc:
            raise UpstreamBroken(
                f"upstream request is not valid HTTP: {exc}", ReconnectReason.PROTOCOL_ERROR
            ) from None

        def stream() -> Http1Protocol:
            return Http1Protocol(
                request,
                head_deadline=deadline,
                head_timeout=self._head_timeout,
                idle_timeout=self._idle_timeout,
                timer_context=self._timer_context,
            )

        protocol = await self._connect(target, stream, before_connect)
        try:
            if before_connect is not None:
                before_connect()
            protocol.send_request()
            await protocol.head()
        except BaseException:
            protocol.abort()
            raise
        return protocol

    async def _connect(
        self,
        target: Target,
        stream: Callable[[], Http1Protocol],
        before_connect: Callable[[], None] | None,
    ) -> Http1Protocol:
        slots = self._connect_slots
        if slots is None:
            return await self._connect_now(target, stream, before_connect)
        async with slots:
            return await self._connect_now(target, stream, before_connect)

    async def _connect_now(
        self,
        target: Target,
        stream: Callable[[], Http1Protocol],
        before_connect: Callable[[], None] | None,
    ) -> Http1Protocol:
        loop = asyncio.get_running_loop()
        timed_out = UpstreamBroken(
            f"upstream connect timed out after {self._connect_timeout:g}s",
            ReconnectReason.CONNECT_ERROR,
        )
        try:
            async with asyncio.timeout(self._connect_timeout):
                addresses = await resolve(target.host, target.port)
        except TimeoutError:
            raise timed_out from None
        except ResolveError as exc:
            raise _failed(exc) from None
        tls = self._context() if target.scheme == "https" else None
        last: UpstreamBroken | None = None
        for address in allowed_addresses(self._allow, target.host, addresses):
            if before_connect is not None:
                before_connect()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _, protocol = await loop.create_connection(
                        stream,
                        address,
                        target.port,
                        ssl=tls,
                        server_hostname=target.host if tls is not None else None,
                    )
            except TimeoutError:
                last = timed_out
            except OSError as exc:  # refused, unreachable, TLS (certificate, handshake)
                last = _failed(exc)
            else:
                assert isinstance(protocol, Http1Protocol)
                return protocol
        assert last is not None
        raise last

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = tls_context()  # on first use: plain-http workers never load CAs
        return self._ssl_context


def request_headers(target: Target, given: Mapping[str, str]) -> Headers:
    """The first request's headers: ours, then the caller's (which win), then the URL's
    credentials as basic ``Authorization``."""
    headers: Headers = {}
    for name, value in (
        ("Host", target.authority),
        ("User-Agent", USER_AGENT),
        ("Accept-Encoding", "gzip, deflate"),
        *given.items(),
    ):
        headers[name.lower()] = (name, value)
    parts = urlsplit(target.url)
    if parts.username or parts.password:
        user = unquote(parts.username or "")
        secret = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")
        headers["authorization"] = ("Authorization", f"Basic {token}")
    return headers


def redirect_headers(origin: Target, following: Target, headers: Headers) -> Headers:
    """The headers of the request that follows a redirect from ``origin``."""
    headers = dict(headers)
    if not origin.same_origin(following):
        if not origin.upgraded_to(following):
            headers.pop("authorization", None)  # credentials stay with their origin
        headers["host"] = ("Host", following.authority)
    headers.pop("cookie", None)
    return headers


def _unusable(url: str, why: str) -> UpstreamBroken:
    return UpstreamBroken(
        f"upstream URL {redact_url(url)} cannot be requested: {why}", ReconnectReason.PROTOCOL_ERROR
    )


def _failed(exc: OSError) -> UpstreamBroken:
    return UpstreamBroken(
        f"upstream connection failed: {type(exc).__name__}: {exc}", ReconnectReason.CONNECT_ERROR
    )
