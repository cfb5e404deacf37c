"""The upstream client's address guard: a fake resolver, and the loop's connect watched.

Every connection goes to an address that passed the allowlist, never to the name, so a name
that resolves elsewhere between the check and the connect (DNS rebinding) cannot slip through.
Connections that are let through reach a scripted loopback server.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from listenerpool.allowlist import Allowlist
from listenerpool.errors import UpstreamError, UpstreamNotAllowed
from tests.workers.scripted_http import ScriptedServer, scripted_server, send
from workers.http1 import UpstreamBroken
from workers.upstream import UpstreamClient

pytestmark = pytest.mark.timeout(60)

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"


def client(allow: Allowlist, head_timeout: float = 10.0) -> UpstreamClient:
    return UpstreamClient(
        allow=allow, connect_timeout=10.0, head_timeout=head_timeout, idle_timeout=10.0,
        max_redirects=5,
    )  # fmt: skip


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    async with scripted_server() as up:
        up.scripts["/"] = send(SSE_HEAD)
        yield up


def resolving_to(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> list[str]:
    """Make the running loop's resolver answer ``addresses`` for any name; returns the names
    it was asked for."""
    asked: list[str] = []

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        asked.append(host)
        family = socket.AF_INET6
        return [(family, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    return asked


def connecting(monkeypatch: pytest.MonkeyPatch, down: frozenset[str] = frozenset()) -> list[str]:
    """Record the address of every connect; refuse those in ``down``, send the others to the
    loopback server (the port is the URL's)."""
    loop = asyncio.get_running_loop()
    real = loop.create_connection
    connects: list[str] = []

    async def create_connection(factory: Any, host: str, port: int, **kwargs: Any) -> Any:
        connects.append(host)
        if host in down:
            raise ConnectionRefusedError(f"{host} refused")
        return await real(factory, "127.0.0.1", port, **kwargs)

    monkeypatch.setattr(loop, "create_connection", create_connection)
    return connects


async def test_connects_only_to_an_address_it_checked(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    # A rebinding name answers a metadata address and a harmless one: the metadata address is
    # skipped, and the connection goes to the checked address itself, not to the name.
    asked = resolving_to(monkeypatch, "169.254.169.254", "127.0.0.1")
    connects = connecting(monkeypatch)
    (await client(Allowlist()).open(server.url("/", host="rebind.test"), {})).abort()
    assert asked == ["rebind.test"]
    assert connects == ["127.0.0.1"]


async def test_refuses_when_no_resolved_address_is_allowed(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    resolving_to(monkeypatch, "169.254.169.254", "fe80::1")
    connects = connecting(monkeypatch)
    with pytest.raises(UpstreamNotAllowed, match="link-local"):
        await client(Allowlist()).open(server.url("/", host="meta.test"), {})
    assert connects == []


async def test_allowlist_applies_to_resolved_addresses(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    resolving_to(monkeypatch, "127.0.0.1")
    connects = connecting(monkeypatch)
    strict = Allowlist.parse("10.0.0.0/8")
    with pytest.raises(UpstreamNotAllowed, match=r"runner \(127.0.0.1\) is not in"):
        await client(strict).open(server.url("/", host="runner"), {})
    (await client(Allowlist.parse("runner")).open(server.url("/", host="runner"), {})).abort()
    assert connects == ["127.0.0.1"]


async def test_ip_literals_are_not_resolved(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    asked = resolving_to(monkeypatch, "10.0.0.1")
    connects = connecting(monkeypatch)
    (await client(Allowlist()).open(server.url("/"), {})).abort()
    with pytest.raises(UpstreamNotAllowed):
        await client(Allowlist()).open(server.url("/", host="169.254.169.254"), {})
    assert asked == []
    assert connects == ["127.0.0.1"]


async def test_falls_back_to_the_next_allowed_address(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    resolving_to(monkeypatch, "::1", "127.0.0.1")
    connects = connecting(monkeypatch, down=frozenset({"::1"}))
    (await client(Allowlist()).open(server.url("/", host="localhost"), {})).abort()
    assert connects == ["::1", "127.0.0.1"]


async def test_reads_past_the_head_deadline_fail_until_the_head_is_complete(
    server: ScriptedServer,
) -> None:
    server.scripts["/part"] = send(b"HTTP/1.1 2")  # and nothing more
    with pytest.raises(UpstreamError, match=r"no complete response head within 0\.3s"):
        await client(Allowlist(), head_timeout=0.3).open(server.url("/part"), {})
    # A complete head ends the deadline: the body is the idle timeout's.
    stream = await client(Allowlist(), head_timeout=0.3).open(server.url("/"), {})
    got = asyncio.ensure_future(stream.read())
    done, _ = await asyncio.wait([got], timeout=0.6)  # twice the head timeout: still reading
    assert not done
    stream.abort()
    with pytest.raises(UpstreamBroken, match="closed"):  # the abort's end, no deadline's
        await got
