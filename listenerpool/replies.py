"""Redis replies as text: redis-py and hiredis give bytes (or an int, or None for a missing
value) wherever a client is not set to decode, and the pool's clients are not."""

from __future__ import annotations


def reply_text(value: object) -> str:
    """``value`` as ``str``: bytes decoded as UTF-8, None (a missing field) as ``""``, anything
    else (an integer reply) by ``str``."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
