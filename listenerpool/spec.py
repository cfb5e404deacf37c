"""What a session listens to: the upstream URL and request headers, validated at the edge."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from listenerpool.errors import HeadersTooLarge, InvalidUpstream

MAX_URL_LENGTH = 8192
MAX_HEADERS = 50
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8192
MAX_HEADERS_BYTES = 16384  # names + values + ": " and CRLF per header, as sent upstream
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1," + str(MAX_HEADER_NAME) + "}$")
# Headers the reader sets itself; a caller overriding them would break resumption or framing.
_RESERVED = frozenset(
    {"last-event-id", "host", "content-length", "transfer-encoding", "connection"}
)


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_url(self.url)
        check_headers(self.headers)

    @property
    def host(self) -> str:
        """The URL's host as written (lower case, IPv6 without brackets)."""
        return urlsplit(self.url).hostname or ""

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
    """Raise :class:`HeadersTooLarge` over the count or total size limits, and
    :class:`InvalidUpstream` for a bad name or value."""
    if not isinstance(headers, Mapping):
        raise InvalidUpstream("headers must be an object of string names to string values")
    if len(headers) > MAX_HEADERS:
        raise HeadersTooLarge(f"{len(headers)} headers: at most {MAX_HEADERS} are allowed")
    total = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise InvalidUpstream(f"invalid header name {name!r}")
        if name.lower() in _RESERVED:
            raise InvalidUpstream(f"header {name!r} is set by the pool and cannot be given")
        if not isinstance(value, str):
            raise InvalidUpstream(f"header {name!r} must have a string value")
        if any(ch in value for ch in "\r\n\x00"):
            raise InvalidUpstream(f"header {name!r} has a CR, LF or NUL in its value")
        if len(value) > MAX_HEADER_VALUE:
            raise HeadersTooLarge(f"header {name!r} has a value over {MAX_HEADER_VALUE} characters")
        total += len(name) + len(value) + 4
    if total > MAX_HEADERS_BYTES:
        raise HeadersTooLarge(f"headers total {total} bytes: at most {MAX_HEADERS_BYTES}")
