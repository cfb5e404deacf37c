"""Every Redis key and channel name of the pool, and the session id rule that guards them.

Per-session keys carry the session id as a Redis Cluster hash tag (``lp:{sid}:...``) so one Lua
script can touch all of a session's keys on one shard.
"""

from __future__ import annotations

import re

from listenerpool.errors import InvalidSessionId

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

SESSIONS = "lp:sessions"  # sorted set: sid -> last update (ms), for listing
LEASE_DEADLINES = "lp:leases"  # sorted set: sid -> lease deadline (ms), read by the reconciler
WORKERS = "lp:workers"  # sorted set: worker id -> heartbeat deadline (ms)
CONTROL_CHANNEL = "lp:ctl"  # pub/sub: cancel notices to workers


def check_session_id(sid: str) -> str:
    """Return ``sid`` unchanged, or raise :class:`InvalidSessionId`."""
    if not isinstance(sid, str) or not SESSION_ID_PATTERN.fullmatch(sid):
        raise InvalidSessionId(
            f"invalid session id {sid!r}: must match {SESSION_ID_PATTERN.pattern}"
        )
    return sid


class SessionKeys:
    """The keys of one session. Construction validates the id, so no bad id reaches Redis."""

    __slots__ = ("cancel", "events", "lease", "live", "sid", "spec", "state")

    def __init__(self, sid: str) -> None:
        self.sid = check_session_id(sid)
        prefix = f"lp:{{{sid}}}"
        self.spec = f"{prefix}:spec"
        self.lease = f"{prefix}:lease"
        self.cancel = f"{prefix}:cancel"
        self.state = f"{prefix}:state"
        self.events = f"{prefix}:events"
        self.live = f"{prefix}:live"


def worker_key(worker_id: str) -> str:
    """Hash with a worker's capacity, load, host and pid."""
    return f"lp:worker:{worker_id}"
