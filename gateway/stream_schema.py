"""The ``/v1/stream`` frames as schemas, for the OpenAPI document (OpenAPI has no WebSocket
operations, so the frames are published as components that the route's description names).
The rules themselves are in :mod:`gateway.streamproto`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from listenerpool.keys import SESSION_ID_PATTERN

Sid = Field(pattern=SESSION_ID_PATTERN.pattern, description="Session id")


class SubscribeFrame(BaseModel):
    """Client to gateway (WebSocket): follow ``sid`` after seq ``after``."""

    op: Literal["subscribe"]
    sid: str = Sid
    after: int = Field(default=0, ge=0, description="The last seq already seen (0: all)")
    token: str | None = Field(
        default=None,
        description="A subscribe token naming sid, for a session the connection's own "
        "credentials do not open",
    )


class UnsubscribeFrame(BaseModel):
    """Client to gateway (WebSocket): stop following ``sid``."""

    op: Literal["unsubscribe"]
    sid: str = Sid


class StreamEventFrame(BaseModel):
    """Gateway to client: one event of one session (its envelope with ``sid``). Over SSE, its
    ``id:`` is the position id of every session of the stream."""

    sid: str = Sid
    seq: int = Field(ge=1, description="The session's event number, from 1 without gaps")
    epoch: int = Field(description="The fencing epoch of the reader that published it")
    event: str = Field(description="The upstream's event type")
    data: str = Field(description="The upstream's payload, verbatim")
    id: str = Field(description="The upstream's event id")


class StreamControlFrame(BaseModel):
    """Gateway to client: ``subscribed`` (``after``), ``unsubscribed``, ``reset``
    (``after``, ``first_seq``: events between are gone from the history) or ``error``
    (``code``, ``message``; ``sid`` null for a frame without one)."""

    op: Literal["subscribed", "unsubscribed", "reset", "error"]
    sid: str | None
    after: int | None = None
    first_seq: int | None = None
    code: str | None = Field(
        default=None,
        description="unknown_session, forbidden, invalid_token, token_expired, "
        "too_many_sessions, too_many_clients, already_subscribed, not_subscribed, "
        "invalid_session_id, invalid_after, bad_frame",
    )
    message: str | None = None


FRAME_MODELS: tuple[type[BaseModel], ...] = (
    SubscribeFrame,
    UnsubscribeFrame,
    StreamEventFrame,
    StreamControlFrame,
)
