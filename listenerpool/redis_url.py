"""What ``LP_REDIS_URL`` names: one Redis server, a Redis Cluster, or a Sentinel-watched primary.

- ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS): one server.
- ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+cluster://``): a
  Redis Cluster; the nodes listed are where the client first asks for the slot map, any
  reachable one suffices.
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master-name>[/db]``
  (``rediss+sentinel://``): the primary that the Sentinels know as ``master-name``; the
  password is the primary's. Sentinels that need a password of their own take it from the
  query parameter ``sentinel_password``.

:func:`parse_redis_url` turns the text into a :class:`RedisTarget` or raises
:class:`InvalidRedisUrl` with a message that names what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qs, unquote, urlsplit

from listenerpool.errors import ListenerPoolError

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


class InvalidRedisUrl(ListenerPoolError, ValueError):
    """``LP_REDIS_URL`` cannot be used; the message says why."""


class RedisKind(StrEnum):
    SINGLE = "single"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


SCHEMES = {
    "redis": (RedisKind.SINGLE, False),
    "rediss": (RedisKind.SINGLE, True),
    "unix": (RedisKind.SINGLE, False),
    "redis+cluster": (RedisKind.CLUSTER, False),
    "rediss+cluster": (RedisKind.CLUSTER, True),
    "redis+sentinel": (RedisKind.SENTINEL, False),
    "rediss+sentinel": (RedisKind.SENTINEL, True),
}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``LP_REDIS_URL``. ``url`` is the original text: for ``single`` it is what
    redis-py's ``from_url`` takes."""

    kind: RedisKind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    master: str = ""
    db: int = 0
    sentinel_password: str | None = None


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``url`` (see the module docstring). Raises :class:`InvalidRedisUrl`."""
    text = url.strip()
    scheme, sep, _ = text.partition("://")
    if not sep:
        raise InvalidRedisUrl(
            f"{_shown(url)} is not a URL: expected one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    if scheme.lower() not in SCHEMES:
        raise InvalidRedisUrl(
            f"unknown scheme {scheme!r} in {_shown(url)}: expected one of "
            + ", ".join(s + "://" for s in SCHEMES)
        )
    kind, ssl = SCHEMES[scheme.lower()]
    if kind is RedisKind.SINGLE:
        _check_single(text)
        return RedisTarget(kind, text, ssl=ssl)
    parts = urlsplit("x://" + text.split("://", 1)[1])
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = _nodes(hostlist, url, DEFAULT_SENTINEL_PORT if kind is RedisKind.SENTINEL else None)
    query = parse_qs(parts.query)
    path = [p for p in parts.path.split("/") if p]
    if kind is RedisKind.CLUSTER:
        if path:
            raise InvalidRedisUrl(
                f"{_shown(url)}: a cluster URL takes no path (Redis Cluster has only database 0)"
            )
        if query:
            raise InvalidRedisUrl(f"{_shown(url)}: unknown parameters {sorted(query)}")
        return RedisTarget(kind, text, nodes, username, password, ssl)
    if not path:
        raise InvalidRedisUrl(
            f"{_shown(url)}: a sentinel URL needs the master name as its path, "
            "e.g. redis+sentinel://h1:26379,h2:26379/mymaster"
        )
    if len(path) > 2:
        raise InvalidRedisUrl(f"{_shown(url)}: expected /<master-name>[/<db>] as the path")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise InvalidRedisUrl(f"{_shown(url)}: database {path[1]!r} is not a number")
        db = int(path[1])
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise InvalidRedisUrl(f"{_shown(url)}: unknown parameters {sorted(unknown)}")
    sentinel_password = query["sentinel_password"][-1] if "sentinel_password" in query else None
    return RedisTarget(
        kind, text, nodes, username, password, ssl, unquote(path[0]), db, sentinel_password
    )


def _check_single(text: str) -> None:
    if text.lower().startswith("unix://"):
        return
    parts = urlsplit(text)
    if "," in parts.netloc:
        raise InvalidRedisUrl(
            f"{_shown(text)} lists several hosts: use redis+cluster:// for a Redis Cluster "
            "or redis+sentinel://.../<master-name> for Sentinel"
        )
    if not parts.hostname:
        raise InvalidRedisUrl(f"{_shown(text)} names no host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise InvalidRedisUrl(f"{_shown(text)}: the port is not a number in 1-65535") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise InvalidRedisUrl(f"{_shown(text)}: database {path!r} is not a number")


def _nodes(hostlist: str, url: str, default_port: int | None) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            raise InvalidRedisUrl(f"{_shown(url)}: empty host in the host list")
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        if not host:
            raise InvalidRedisUrl(f"{_shown(url)}: {item!r} names no host")
        if not port_text:
            if default_port is None:
                raise InvalidRedisUrl(f"{_shown(url)}: {item!r} needs a port (host:port)")
            port = default_port
        elif not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidRedisUrl(f"{_shown(url)}: port {port_text!r} of {host!r} is not 1-65535")
        else:
            port = int(port_text)
        nodes.append((host, port))
    return tuple(nodes)


def _shown(url: str) -> str:
    """The URL with any password masked, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return repr(url)
    userinfo, at, tail = rest.partition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
        return repr(f"{scheme}://{userinfo}@{tail}")
    return repr(url)
