"""Who may call the gateway: API tokens on the control API, subscribe tokens on event streams.

With no ``LP_API_TOKEN`` the control API is open, which is why the gateway then listens on
loopback only (see :func:`listen_host`). With ``LP_SIGNING_KEY`` set, following a session needs
a subscribe token for it (``?token=`` — browsers cannot set headers on a WebSocket or an
EventSource — or a bearer header) or an API token; with only ``LP_API_TOKEN`` set, it needs an
API token. Tokens never reach the logs: query values are masked in uvicorn's request lines
(:func:`listenerpool.logs.redact_server_logs`).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request

from gateway.errors import ApiError
from listenerpool.auth import InvalidToken, bearer_token, read_subscribe_token, token_matches
from listenerpool.settings import Settings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers=_CHALLENGE)


def check_api_token(settings: Settings, authorization: str | None) -> None:
    """Raise a 401 :class:`ApiError` unless the header carries a valid API token (or none is
    configured)."""
    tokens = settings.api_tokens
    if not tokens:
        return
    presented = bearer_token(authorization)
    if presented is None:
        raise _unauthorized("missing_token", "this call needs Authorization: Bearer <API token>")
    if not token_matches(presented, tokens):
        raise _unauthorized("invalid_token", "the API token is not valid")


async def require_api_token(request: Request) -> None:
    """Route dependency of the control API."""
    check_api_token(request.app.state.settings, request.headers.get("authorization"))


@dataclass(frozen=True)
class StreamAccess:
    """The sessions a caller may follow: those its subscribe token names, or (``sids`` None)
    every session (an API token, or no auth configured)."""

    sids: frozenset[str] | None

    def allows(self, sid: str) -> bool:
        return self.sids is None or sid in self.sids


def stream_access(
    settings: Settings, headers: Mapping[str, str], query: Mapping[str, str]
) -> StreamAccess:
    """What the caller may follow; raises a 401 :class:`ApiError` without valid credentials."""
    tokens, keys = settings.api_tokens, settings.signing_keys
    if not tokens and not keys:
        return StreamAccess(None)
    presented = query.get("token") or bearer_token(headers.get("authorization"))
    if presented is None:
        wanted = "a subscribe token (?token=) or an API token" if keys else "an API token"
        raise _unauthorized("missing_token", f"following a session needs {wanted}")
    return token_access(settings, presented)


def token_access(settings: Settings, presented: str) -> StreamAccess:
    """What a presented token (API or subscribe token) opens; raises a 401 :class:`ApiError`
    for one that is not valid."""
    tokens, keys = settings.api_tokens, settings.signing_keys
    if not tokens and not keys:
        return StreamAccess(None)
    if tokens and token_matches(presented, tokens):
        return StreamAccess(None)
    if not keys:
        raise _unauthorized("invalid_token", "the API token is not valid")
    try:
        return StreamAccess(read_subscribe_token(keys, presented, time.time()).sids)
    except InvalidToken as exc:
        raise _unauthorized(exc.code, str(exc)) from None


def check_subscriber(
    settings: Settings, sid: str, headers: Mapping[str, str], query: Mapping[str, str]
) -> None:
    """Raise an :class:`ApiError` (401, or 403 for another session's token) unless the caller
    may follow ``sid``."""
    if not stream_access(settings, headers, query).allows(sid):
        raise ApiError(403, "wrong_session", "the subscribe token is for another session")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_host(settings: Settings) -> str:
    """Where the gateway may listen: anywhere with an API token, loopback only without."""
    if settings.api_tokens:
        return settings.host
    if not is_loopback(settings.host):
        log.warning(
            "LP_API_TOKEN is not set, so the control API is unauthenticated: listening on %s "
            "only, not on LP_HOST=%s. Set LP_API_TOKEN to listen there.",
            LOOPBACK,
            settings.host,
        )
        return LOOPBACK
    log.warning(
        "LP_API_TOKEN is not set: the control API is unauthenticated and the gateway listens "
        "on loopback (%s) only",
        settings.host,
    )
    return settings.host
