"""Where a reader may connect: the upstream host resolved here and every address checked.

The reader resolves the host itself and connects to one of the addresses that passed
:func:`~listenerpool.allowlist.address_refusal`, never to the name: a name that re-resolves
elsewhere between a check and the connect (DNS rebinding) cannot slip through. Every redirect
hop is a new connection and passes the same check.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket

from listenerpool.allowlist import Allowlist, address_refusal, not_allowed


class ResolveError(OSError):
    """The host name did not resolve to any address."""


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses, in the resolver's order (an IP literal resolves to itself).

    Raises :class:`ResolveError`; the caller bounds the time.
    """
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ResolveError(f"cannot resolve {host}: {exc}") from None
    seen: dict[str, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]).split("%", 1)[0], None)
    return list(seen)


def allowed_addresses(allow: Allowlist, host: str, addresses: list[str]) -> list[str]:
    """The addresses ``allow`` accepts for URL host ``host``, in order.

    Raises :class:`~listenerpool.errors.UpstreamNotAllowed` (the last refusal) when none is.
    """
    allowed: list[str] = []
    refusal: str | None = None
    for address in addresses:
        reason = _refusal(allow, host, address)
        if reason is not None:  # reported if no address is allowed
            refusal = reason
            continue
        allowed.append(address)
    if not allowed:
        raise not_allowed(refusal or f"{host} has no address")
    return allowed


@functools.lru_cache(maxsize=4096)
def _refusal(allow: Allowlist, host: str, address: str) -> str | None:
    """:func:`~listenerpool.allowlist.address_refusal` of a resolved address. A pure function
    of its arguments, kept for the next connection: a fleet's readers connect to a few
    upstreams, and parsing and checking the address each time was 2-3 % of the CPU of a
    worker taking sessions over."""
    return address_refusal(allow, host, ipaddress.ip_address(address))
