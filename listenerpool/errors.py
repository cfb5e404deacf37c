"""Every error listenerpool raises derives from :class:`ListenerPoolError`.

The hierarchy reads as a decision tree: configuration problems, invalid input from a caller,
ownership losses seen by a reader, and problems with an upstream's stream.
"""

from __future__ import annotations


class ListenerPoolError(Exception):
    """Base class of every error raised by listenerpool."""


class InvalidInput(ListenerPoolError):
    """A caller passed something the pool refuses (bad session id, bad URL, bad headers)."""


class InvalidSessionId(InvalidInput):
    """The session id does not match ``^[A-Za-z0-9._-]{1,128}$``."""


class InvalidUpstream(InvalidInput):
    """The upstream URL or headers cannot be used (wrong scheme, no host, bad header)."""


class UpstreamNotAllowed(InvalidUpstream):
    """The upstream's host or address is refused by ``LP_UPSTREAM_ALLOW`` or the guarded ranges
    (link-local, cloud metadata). Raised by the gateway before Redis is touched, and by a
    worker's connection when the resolved address is refused; retrying will not change it."""


class HeadersTooLarge(InvalidUpstream):
    """The upstream request headers exceed the count or size limits."""


class OwnershipError(ListenerPoolError):
    """A reader no longer owns its session and must stop at once."""


class NotOwner(OwnershipError):
    """Redis refused a write: the lease token or epoch is not the reader's any more."""


class LeaseLost(OwnershipError):
    """A renewal found the lease gone or held by someone else, or the reader self-fenced."""


class Cancelled(OwnershipError):
    """The session was cancelled (tombstone seen or cancel notice received)."""


class StreamError(ListenerPoolError):
    """The upstream's byte stream broke the event-stream rules or our limits."""


class EventTooLarge(StreamError):
    """One line or one event exceeded the configured maximum event size."""


class UpstreamError(ListenerPoolError):
    """The upstream answered in a way that prevents listening."""

    def __init__(self, message: str, *, permanent: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after  # seconds the upstream asked us to wait, if it did


class UpstreamStatus(UpstreamError):
    """The upstream answered a status worth retrying (5xx, 408, 429) instead of a stream."""


class UpstreamRejected(UpstreamError):
    """The upstream refused the request with a status that retrying will not change (4xx)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)
