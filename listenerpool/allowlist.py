"""Which upstream hosts and addresses a reader may connect to (``LP_UPSTREAM_ALLOW``).

Pure functions, no DNS and no sockets: the gateway checks a URL's host as written when a
session is declared, and the worker checks every address it is about to connect to, after
resolution, on every connection and every redirect hop.

Rules:

- Unset or empty allowlist: every address is allowed except the guarded ones below. Loopback
  and private addresses are allowed, because upstreams are usually internal services.
- With entries: an address is allowed when it lies in a CIDR entry, or when the URL's host
  name matches a host entry (``runner.internal``) or a wildcard (``*.example.com`` matches any
  name below ``example.com``, not ``example.com`` itself).
- Guarded addresses (link-local, cloud metadata, unspecified, multicast, broadcast) and the
  cloud metadata host names are refused unless an entry names them explicitly: a CIDR entry
  lying inside the guarded range (``169.254.169.254/32``), or the exact host name. A broad
  entry such as ``0.0.0.0/0`` or a wildcard does not count.
- IPv6 forms that carry an IPv4 address (``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``,
  6to4) are judged by that IPv4 address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, TypeAlias

from listenerpool.errors import UpstreamNotAllowed

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

SETTING: Final = "LP_UPSTREAM_ALLOW"

#: Refused unless an entry lies inside them: (network, what it is).
GUARDED_NETWORKS: Final[tuple[tuple[IPNetwork, str], ...]] = tuple(
    (ipaddress.ip_network(net), what)
    for net, what in (
        ("169.254.169.254/32", "a cloud metadata address"),
        ("169.254.170.2/32", "a cloud metadata address"),
        ("100.100.100.200/32", "a cloud metadata address"),
        ("fd00:ec2::254/128", "a cloud metadata address"),
        ("169.254.0.0/16", "a link-local address"),
        ("fe80::/10", "a link-local address"),
        ("0.0.0.0/8", "an unspecified address"),
        ("::/128", "an unspecified address"),
        ("224.0.0.0/4", "a multicast address"),
        ("ff00::/8", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
    )
)
#: Cloud metadata services' host names: refused unless named exactly by an entry.
METADATA_HOSTS: Final = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_LABEL: Final = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Parsed ``LP_UPSTREAM_ALLOW``: exact host names, wildcard suffixes and networks."""

    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".example.com" for "*.example.com"
    networks: tuple[IPNetwork, ...] = ()

    @property
    def restricted(self) -> bool:
        """True when entries are given: only matching upstreams are allowed."""
        return bool(self.hosts or self.suffixes or self.networks)

    @classmethod
    def parse(cls, text: str | None) -> Allowlist:
        """Parse a comma-separated list. Raises ValueError naming the first bad entry."""
        hosts: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in (text or "").split(","):
            entry = raw.strip()
            if not entry:
                continue
            if entry.startswith("*."):
                name = _host_name(entry[2:])
                if name is None:
                    raise ValueError(f"entry {entry!r} is not a valid wildcard (*.example.com)")
                suffixes.append("." + name)
                continue
            network = _network(entry)
            if network is not None:
                networks.append(network)
                continue
            name = _host_name(entry)
            if name is None:
                raise ValueError(
                    f"entry {entry!r} is neither a host name, a *.wildcard nor an IP/CIDR"
                )
            hosts.add(name)
        return cls(frozenset(hosts), tuple(suffixes), tuple(networks))


def normalize_host(host: str) -> str:
    """Lower case, without IPv6 brackets or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` spells, if it is an IP literal (IPv6 zone ids are dropped)."""
    try:
        return ipaddress.ip_address(normalize_host(host).split("%", 1)[0])
    except ValueError:
        return None


def effective_address(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


def host_refusal(allow: Allowlist, host: str) -> str | None:
    """Why a URL host, as written, is refused (None when it may be allowed).

    Used without DNS when a session is declared: a name that could resolve into a CIDR entry
    is not refused here; the worker decides on the resolved address.
    """
    name = normalize_host(host)
    literal = literal_address(name)
    if literal is not None:
        return address_refusal(allow, None, literal)
    if name in METADATA_HOSTS and name not in allow.hosts:
        return f"{name} is a cloud metadata host, refused unless {SETTING} names it"
    if allow.restricted and not allow.networks and not _name_matches(allow, name):
        return f"host {name} is not in {SETTING}"
    return None


def address_refusal(allow: Allowlist, host: str | None, address: IPAddress) -> str | None:
    """Why connecting to ``address`` (resolved from URL host ``host``) is refused, or None."""
    ip = effective_address(address)
    name = normalize_host(host) if host is not None else None
    if name is not None and literal_address(name) is not None:
        name = None  # an IP literal is judged by its address alone
    if name in METADATA_HOSTS and name not in allow.hosts:
        return f"{name} is a cloud metadata host, refused unless {SETTING} names it"
    shown = f"{name} ({address})" if name else str(address)
    for guarded, what in GUARDED_NETWORKS:
        if ip.version == guarded.version and ip in guarded:
            named = any(
                ip in net and net.version == guarded.version and net.subnet_of(guarded)  # type: ignore[arg-type]
                for net in allow.networks
            )
            if named or (name is not None and name in allow.hosts):
                return None
            return f"{shown} is {what}, refused unless {SETTING} names it"
    if not allow.restricted:
        return None
    if any(ip.version == net.version and ip in net for net in allow.networks):
        return None
    if name is not None and _name_matches(allow, name):
        return None
    return f"{shown} is not in {SETTING}"


def check_host(allow: Allowlist, host: str) -> None:
    """Raise :class:`UpstreamNotAllowed` when :func:`host_refusal` refuses ``host``."""
    reason = host_refusal(allow, host)
    if reason is not None:
        raise not_allowed(reason)


def not_allowed(reason: str) -> UpstreamNotAllowed:
    """The error for an upstream refused for ``reason``."""
    return UpstreamNotAllowed(f"upstream not allowed: {reason}")


def _name_matches(allow: Allowlist, name: str) -> bool:
    return name in allow.hosts or any(name.endswith(suffix) for suffix in allow.suffixes)


def _network(entry: str) -> IPNetwork | None:
    text = entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry
    if "/" not in text and literal_address(text) is None:
        return None
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"entry {entry!r} is not a valid IP network: {exc}") from None


def _host_name(text: str) -> str | None:
    name = normalize_host(text)
    if not name or len(name) > 253:
        return None
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name
