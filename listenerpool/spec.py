"""What a session listens to: the upstream URL and request headers, validated at the edge."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from listenerpool.errors import InvalidUpstream

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
# Headers the reader sets itself; a caller overriding them would break resumption or framing.
_RESERVED = frozenset(
    {"last-event-id", "host", "content-length", "transfer-encoding", "connection"}
)
MAX_URL_LENGTH = 8192
MAX_HEADERS = 64
MAX_HEADER_VALUE = 8192


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_url(self.url)
        check_headers(self.headers)

    def headers_json(self) -> str:
        """Canonical JSON (sorted keys) so an identical spec compares equal in Redis."""
        return json.dumps(dict(self.headers), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_redis(cls, url: str, headers_json: str) -> UpstreamSpec:
        return cls(url=url, headers=json.loads(headers_json or "{}"))


def check_url(url: str) -> None:
    if not isinstance(url, str) or not url:
        raise InvalidUpstream("upstream url is required")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidUpstream(f"upstream url longer than {MAX_URL_LENGTH} characters")
    if any(ch in url for ch in "\r\n\t ") or not url.isprintable():
        raise InvalidUpstream("upstream url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidUpstream(f"upstream url {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidUpstream(f"upstream url must be http or https, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise InvalidUpstream(f"upstream url {url!r} has no host")
    if port == 0:
        raise InvalidUpstream(f"upstream url {url!r} has port 0")


def check_headers(headers: Mapping[str, str]) -> None:
    if not isinstance(headers, Mapping):
        raise InvalidUpstream("headers must be an object of string names to string values")
    if len(headers) > MAX_HEADERS:
        raise InvalidUpstream(f"at most {MAX_HEADERS} headers are allowed")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise InvalidUpstream(f"invalid header name {name!r}")
        if name.lower() in _RESERVED:
            raise InvalidUpstream(f"header {name!r} is set by the pool and cannot be given")
        if not isinstance(value, str):
            raise InvalidUpstream(f"header {name!r} must have a string value")
        if len(value) > MAX_HEADER_VALUE or any(ch in value for ch in "\r\n\x00"):
            raise InvalidUpstream(f"header {name!r} has an invalid or oversized value")
