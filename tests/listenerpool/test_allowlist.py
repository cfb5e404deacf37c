"""listenerpool.allowlist: pure decisions on hosts and addresses, no DNS and no sockets."""

from __future__ import annotations

import ipaddress
import re

import pytest

from listenerpool.allowlist import (
    Allowlist,
    address_refusal,
    check_host,
    effective_address,
    host_refusal,
)
from listenerpool.errors import InvalidUpstream, UpstreamNotAllowed
from listenerpool.settings import SettingsError, load_settings
from workers.addresses import allowed_addresses

OPEN = Allowlist()
STRICT = Allowlist.parse("runner.internal, *.example.com, 10.0.0.0/8, 2001:db8::/32")


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_parse_sorts_entries_into_hosts_wildcards_and_networks() -> None:
    allow = Allowlist.parse(" Runner.Internal. ,*.Example.com,10.0.0.0/8,[::1],192.0.2.7 ,, ")
    assert allow.hosts == frozenset({"runner.internal"})
    assert allow.suffixes == (".example.com",)
    assert allow.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert allow.restricted
    assert not Allowlist.parse(None).restricted
    assert not Allowlist.parse(" , ").restricted


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1/8", "has host bits set"),
        ("10.0.0.0/33", "not a valid IP network"),
        ("*.", "not a valid wildcard"),
        ("a..b", "neither a host name"),
        ("exa mple.com", "neither a host name"),
        ("http://x.com", "not a valid IP network"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Allowlist.parse(text)


def test_a_bad_allowlist_stops_the_settings_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match=re.escape("LP_UPSTREAM_ALLOW: entry '10.0.0.1/8'")):
        load_settings(upstream_allow="10.0.0.1/8")
    assert load_settings(upstream_allow="*.example.com").allowlist.suffixes == (".example.com",)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.170.2",
        "169.254.1.1",
        "fe80::1",
        "fd00:ec2::254",
        "100.100.100.200",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "::ffff:169.254.169.254",  # IPv4-mapped
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    ],
)
def test_guarded_addresses_are_refused_without_an_allowlist(address: str) -> None:
    reason = address_refusal(OPEN, "upstream.test", ip(address))
    assert reason is not None and "refused unless LP_UPSTREAM_ALLOW names it" in reason
    with pytest.raises(UpstreamNotAllowed):
        allowed_addresses(OPEN, "upstream.test", [address])


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.1.2.3", "192.168.0.5", "8.8.8.8"])
def test_without_an_allowlist_loopback_private_and_public_addresses_are_allowed(
    address: str,
) -> None:
    assert address_refusal(OPEN, "runner", ip(address)) is None


def test_with_an_allowlist_only_matching_names_or_networks_are_allowed() -> None:
    assert address_refusal(STRICT, "runner.internal", ip("192.168.1.1")) is None  # by name
    assert address_refusal(STRICT, "a.b.example.com", ip("203.0.113.9")) is None  # wildcard
    assert address_refusal(STRICT, "anything", ip("10.9.9.9")) is None  # by network
    assert address_refusal(STRICT, None, ip("2001:db8::5")) is None
    assert address_refusal(STRICT, "example.com", ip("203.0.113.9")) == (
        "example.com (203.0.113.9) is not in LP_UPSTREAM_ALLOW"
    )  # the wildcard does not cover the apex
    assert address_refusal(STRICT, "evil.test", ip("127.0.0.1")) is not None
    assert address_refusal(STRICT, "badexample.com", ip("8.8.8.8")) is not None


def test_an_ip_literal_is_judged_by_its_address_not_by_name_entries() -> None:
    allow = Allowlist.parse("127.0.0.1, runner.internal")
    assert address_refusal(allow, "127.0.0.1", ip("127.0.0.1")) is None
    assert address_refusal(allow, "127.0.0.2", ip("127.0.0.2")) is not None


def test_guarded_addresses_need_an_entry_inside_the_guarded_range() -> None:
    metadata = ip("169.254.169.254")
    # Broad entries and wildcards do not count as naming a guarded address.
    for broad in ("0.0.0.0/0", "169.0.0.0/8", "*.example.com"):
        assert address_refusal(Allowlist.parse(broad), "x.example.com", metadata) is not None
    # An entry inside the range, or the exact host name, does.
    assert address_refusal(Allowlist.parse("169.254.169.254/32"), None, metadata) is None
    assert address_refusal(Allowlist.parse("169.254.0.0/16"), None, ip("169.254.3.4")) is None
    assert address_refusal(Allowlist.parse("meta.internal"), "meta.internal", metadata) is None
    assert address_refusal(Allowlist.parse("fe80::/10"), None, ip("fe80::2")) is None


def test_metadata_host_names_are_refused_unless_named_exactly() -> None:
    assert host_refusal(OPEN, "metadata.google.internal") is not None
    assert host_refusal(OPEN, "METADATA.GOOGLE.INTERNAL.") is not None
    assert address_refusal(OPEN, "metadata.google.internal", ip("10.0.0.1")) is not None
    allow = Allowlist.parse("metadata.google.internal")
    assert host_refusal(allow, "metadata.google.internal") is None
    assert address_refusal(allow, "metadata.google.internal", ip("169.254.169.254")) is None


def test_host_refusal_without_dns() -> None:
    # Literals are decided at once.
    assert host_refusal(OPEN, "169.254.169.254") is not None
    assert host_refusal(OPEN, "[fe80::1]") is not None
    assert host_refusal(OPEN, "127.0.0.1") is None
    assert host_refusal(STRICT, "10.0.0.1") is None
    assert host_refusal(STRICT, "192.168.0.1") is not None
    # A name outside the host entries may still resolve into a CIDR entry: left to the worker.
    assert host_refusal(STRICT, "unknown.test") is None
    names_only = Allowlist.parse("runner.internal, *.example.com")
    assert host_refusal(names_only, "runner.internal") is None
    assert host_refusal(names_only, "x.example.com") is None
    assert (
        host_refusal(names_only, "unknown.test") == "host unknown.test is not in LP_UPSTREAM_ALLOW"
    )
    with pytest.raises(
        UpstreamNotAllowed, match=re.escape("upstream not allowed: host unknown.test")
    ):
        check_host(names_only, "unknown.test")


def test_upstream_not_allowed_is_an_invalid_upstream() -> None:
    assert issubclass(UpstreamNotAllowed, InvalidUpstream)


def test_effective_address_unwraps_embedded_ipv4() -> None:
    assert effective_address(ip("::ffff:10.0.0.1")) == ip("10.0.0.1")
    assert effective_address(ip("64:ff9b::0a00:0001")) == ip("10.0.0.1")
    assert effective_address(ip("2001:db8::1")) == ip("2001:db8::1")
