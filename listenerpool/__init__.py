"""listenerpool: one reader per session fleet-wide, events fanned out through Redis."""

import listenerpool.rqprefix  # noqa: F401 - before anything imports rq
from listenerpool.control import ClaimOutcome, ClaimResult, SessionControl, SessionStatus
from listenerpool.envelope import Envelope
from listenerpool.errors import (
    Cancelled,
    EventTooLarge,
    HeadersTooLarge,
    InvalidInput,
    InvalidSessionId,
    InvalidUpstream,
    LeaseLost,
    ListenerPoolError,
    NotOwner,
    StreamError,
    UpstreamError,
    UpstreamNotAllowed,
    UpstreamRejected,
    UpstreamStatus,
)
from listenerpool.settings import Settings, SettingsError, load_settings
from listenerpool.sse import SSEEvent, SSEParser

__all__ = [
    "Cancelled",
    "ClaimOutcome",
    "ClaimResult",
    "Envelope",
    "EventTooLarge",
    "HeadersTooLarge",
    "InvalidInput",
    "InvalidSessionId",
    "InvalidUpstream",
    "LeaseLost",
    "ListenerPoolError",
    "NotOwner",
    "SSEEvent",
    "SSEParser",
    "SessionControl",
    "SessionStatus",
    "Settings",
    "SettingsError",
    "StreamError",
    "UpstreamError",
    "UpstreamNotAllowed",
    "UpstreamRejected",
    "UpstreamStatus",
    "load_settings",
]
