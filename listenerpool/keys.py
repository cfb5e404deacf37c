"""Every Redis key and channel name of the pool, and the session id rule that guards them.

Per-session keys carry the session id as a Redis Cluster hash tag (``lp:{sid}:...``) so one Lua
script can touch all of a session's keys on one shard. No script touches anything else: the
session indexes are spread over ``INDEX_BUCKETS`` buckets, each with its own hash tag
(``lp:{ix.<n>}:...``), and are updated by separate commands (see :mod:`listenerpool.index`).
"""

from __future__ import annotations

import re
import zlib

from listenerpool.errors import InvalidSessionId

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

# The session indexes are split into this many buckets so that a million sessions do not all
# land on one cluster shard. Fixed: changing it strands the entries of the old buckets.
INDEX_BUCKETS = 16
SPEC_PATTERN = "lp:{*}:spec"  # SCAN match for every session's spec (rebuilding an index)
WORKERS = "lp:workers"  # sorted set: worker id -> heartbeat deadline (ms)
CONTROL_CHANNEL = "lp:ctl"  # sharded pub/sub: cancel and reconnect notices to workers
PROBE_CHANNEL = "lp:probe"  # sharded pub/sub, never followed: a start-up check of the server
RQ_KEY_PREFIX = "{rq}"  # rq's keys, all in one hash slot (see listenerpool.rqprefix)


def index_bucket(sid: str) -> int:
    """The index bucket of a session: stable across processes and releases."""
    return zlib.crc32(sid.encode()) % INDEX_BUCKETS


def sessions_index(bucket: int) -> str:
    """Sorted set: sid -> last update (ms), for listing."""
    return f"lp:{{ix.{bucket}}}:sessions"


def lease_index(bucket: int) -> str:
    """Sorted set: sid -> lease deadline (ms), read by the reconciler."""
    return f"lp:{{ix.{bucket}}}:leases"


def index_intact(bucket: int) -> str:
    """String ``rebuilding`` or ``intact``; missing once the bucket was lost (a cluster shard
    brought back empty, a Redis restarted without its data), until a reconciler rebuilt it."""
    return f"lp:{{ix.{bucket}}}:intact"


def check_session_id(sid: str) -> str:
    """Return ``sid`` unchanged, or raise :class:`InvalidSessionId`."""
    if not isinstance(sid, str) or not SESSION_ID_PATTERN.fullmatch(sid):
        raise InvalidSessionId(
            f"invalid session id {sid!r}: must match {SESSION_ID_PATTERN.pattern}"
        )
    return sid


class SessionKeys:
    """The keys of one session. Construction validates the id, so no bad id reaches Redis."""

    __slots__ = (
        "bucket",
        "cancel",
        "events",
        "lease",
        "lease_index",
        "live",
        "sessions_index",
        "sid",
        "spec",
        "state",
    )

    def __init__(self, sid: str) -> None:
        self.sid = check_session_id(sid)
        prefix = f"lp:{{{sid}}}"
        self.spec = f"{prefix}:spec"
        self.lease = f"{prefix}:lease"
        self.cancel = f"{prefix}:cancel"
        self.state = f"{prefix}:state"
        self.events = f"{prefix}:events"
        self.live = f"{prefix}:live"  # a sharded pub/sub channel, in the same slot
        # Not in the session's slot: never touched by the same script as the keys above.
        self.bucket = index_bucket(sid)
        self.lease_index = lease_index(self.bucket)
        self.sessions_index = sessions_index(self.bucket)


def session_of_spec(key: bytes | str) -> str | None:
    """The session id of a spec key found by ``SPEC_PATTERN``; None for a key the pool did not
    write (the pattern also matches ids the session id rule refuses)."""
    text = key.decode() if isinstance(key, bytes) else key
    prefix, suffix = SPEC_PATTERN.split("*")
    sid = text.removeprefix(prefix).removesuffix(suffix)
    return sid if SESSION_ID_PATTERN.fullmatch(sid) else None


def worker_key(worker_id: str) -> str:
    """Hash with a worker's capacity, load, host and pid."""
    return f"lp:worker:{worker_id}"
