"""workers.transport.GuardedBackend without sockets: a fake resolver and a fake inner backend."""

from __future__ import annotations

import asyncio
import socket
import time
import typing
from typing import Any

import httpcore
import pytest

from listenerpool.allowlist import Allowlist
from listenerpool.errors import UpstreamError, UpstreamNotAllowed
from workers.transport import GuardedBackend


class FakeStream(httpcore.AsyncNetworkStream):
    def __init__(self, reads: list[bytes | type[Exception]]) -> None:
        self.reads = reads

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        item = self.reads.pop(0)
        if isinstance(item, bytes):
            return item
        raise item("read timed out")

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        pass

    async def aclose(self) -> None:
        pass


class FakeBackend(httpcore.AsyncNetworkBackend):
    """Records where it was asked to connect; refuses the addresses in ``down``."""

    def __init__(self, down: frozenset[str] = frozenset()) -> None:
        self.connects: list[str] = []
        self.down = down
        self.reads: list[bytes | type[Exception]] = [b"x"]

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append(host)
        if host in self.down:
            raise httpcore.ConnectError(f"{host} refused")
        return FakeStream(self.reads)


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


async def test_connects_only_to_an_address_it_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    # A rebinding name answers a metadata address and a harmless one: the metadata address is
    # skipped, and the connection goes to the checked address itself, not to the name.
    asked = resolving_to(monkeypatch, "169.254.169.254", "127.0.0.1")
    inner = FakeBackend()
    backend = GuardedBackend(Allowlist(), None, inner=inner)
    await backend.connect_tcp("rebind.test", 80)
    assert asked == ["rebind.test"]
    assert inner.connects == ["127.0.0.1"]


async def test_refuses_when_no_resolved_address_is_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolving_to(monkeypatch, "169.254.169.254", "fe80::1")
    inner = FakeBackend()
    with pytest.raises(UpstreamNotAllowed, match="link-local"):
        await GuardedBackend(Allowlist(), None, inner=inner).connect_tcp("meta.test", 80)
    assert inner.connects == []


async def test_allowlist_applies_to_resolved_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving_to(monkeypatch, "127.0.0.1")
    inner = FakeBackend()
    strict = Allowlist.parse("10.0.0.0/8")
    with pytest.raises(UpstreamNotAllowed, match=r"runner \(127.0.0.1\) is not in"):
        await GuardedBackend(strict, None, inner=inner).connect_tcp("runner", 80)
    await GuardedBackend(Allowlist.parse("runner"), None, inner=inner).connect_tcp("runner", 80)
    assert inner.connects == ["127.0.0.1"]


async def test_ip_literals_are_not_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = resolving_to(monkeypatch, "10.0.0.1")
    inner = FakeBackend()
    await GuardedBackend(Allowlist(), None, inner=inner).connect_tcp("127.0.0.1", 80)
    with pytest.raises(UpstreamNotAllowed):
        await GuardedBackend(Allowlist(), None, inner=inner).connect_tcp("169.254.169.254", 80)
    assert asked == []
    assert inner.connects == ["127.0.0.1"]


async def test_falls_back_to_the_next_allowed_address(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving_to(monkeypatch, "::1", "127.0.0.1")
    inner = FakeBackend(down=frozenset({"::1"}))
    await GuardedBackend(Allowlist(), None, inner=inner).connect_tcp("localhost", 80)
    assert inner.connects == ["::1", "127.0.0.1"]


async def test_reads_past_the_head_deadline_fail_until_it_is_cleared() -> None:
    inner = FakeBackend()
    inner.reads = [b"HTTP/1.1 2", httpcore.ReadTimeout, b"body"]
    backend = GuardedBackend(Allowlist(), time.monotonic() + 60, inner=inner)
    stream = await backend.connect_tcp("127.0.0.1", 80)
    assert await stream.read(100) == b"HTTP/1.1 2"
    backend.head_deadline = time.monotonic() - 1  # the deadline passes mid-head
    with pytest.raises(UpstreamError, match="no complete response head within"):
        await stream.read(100)
    backend.head_deadline = None  # head complete: reads are the inner stream's again
    with pytest.raises(httpcore.ReadTimeout):
        await stream.read(100)
    assert await stream.read(100) == b"body"
