"""Where a reader may connect: the upstream host resolved here and every address checked.

The reader resolves the host itself and connects to one of the addresses that passed
:func:`~listenerpool.allowlist.check_address`, never to the name: a name that re-resolves
elsewhere between a check and the connect (DNS rebinding) cannot slip through. Every redirect
hop is a new connection and passes the same check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from listenerpool.allowlist import Allowlist, check_address
from listenerpool.errors import UpstreamNotAllowed


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
    refusal: UpstreamNotAllowed | None = None
    for address in addresses:
        try:
            check_address(allow, host, ipaddress.ip_address(address))
        except UpstreamNotAllowed as exc:  # reported if no address is allowed
            refusal = exc
            continue
        allowed.append(address)
    if not allowed:
        raise refusal or UpstreamNotAllowed(f"upstream not allowed: {host} has no address")
    return allowed
