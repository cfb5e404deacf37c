"""Credentials, as pure functions: API bearer tokens and signed subscribe tokens.

An API token is a shared secret presented as ``Authorization: Bearer <token>``; several may be
valid at once so they can be rotated. A subscribe token lets a browser follow one session, or
several, until an expiry without holding an API token: ``<payload>.<mac>``, both unpadded
base64url, where the payload is the JSON ``{"sid", "exp"}`` or ``{"sids", "exp"}`` (exp in Unix
seconds) and the mac is HMAC-SHA256 of the encoded payload under a signing key. The first
signing key signs; any listed key verifies, so a key is rotated by prepending the new one, then
dropping the old once its tokens have expired.

Every comparison of secret material is constant-time, and every token is checked against every
key or token (no early exit that would tell which one nearly matched).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass

from listenerpool.errors import ListenerPoolError

MAX_TOKEN_CHARS = 64 * 1024  # room for a token naming hundreds of long session ids


class InvalidToken(ListenerPoolError):
    """A subscribe token is malformed, forged, for another session, or expired."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SubscribeGrant:
    """What a valid subscribe token allows: following ``sid`` until ``expires_at``."""

    sid: str
    expires_at: int


@dataclass(frozen=True)
class SubscribeClaims:
    """A valid subscribe token's sessions and expiry."""

    sids: frozenset[str]
    expires_at: int


def split_secrets(value: str | None) -> tuple[str, ...]:
    """The comma-separated secrets of a setting, blanks removed."""
    if not value:
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(presented: str, valid: Sequence[str]) -> bool:
    """Whether ``presented`` equals one of ``valid``, in time independent of which one."""
    given = presented.encode()
    matched = False
    for token in valid:
        matched |= hmac.compare_digest(given, token.encode())
    return matched


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: str, payload: str) -> bytes:
    return hmac.new(key.encode(), payload.encode("ascii"), hashlib.sha256).digest()


def sign_subscribe_token(keys: Sequence[str], sid: str | Sequence[str], expires_at: int) -> str:
    """A token for following ``sid`` (one session id, or a list of them) until ``expires_at``
    (Unix seconds), signed with the first key."""
    if not keys:
        raise ValueError("no signing key")
    claims: dict[str, object] = (
        {"sid": sid, "exp": expires_at}
        if isinstance(sid, str)
        else {"sids": list(sid), "exp": expires_at}
    )
    payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    return f"{payload}.{_b64encode(_mac(keys[0], payload))}"


def read_subscribe_token(keys: Sequence[str], token: str, now: float) -> SubscribeClaims:
    """The sessions ``token`` lets its bearer follow at ``now``; raises :class:`InvalidToken`."""
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise InvalidToken("invalid_token", "the subscribe token is malformed")
    payload, _, mac_text = token.partition(".")
    try:
        mac = _b64decode(mac_text)
    except (binascii.Error, ValueError):
        raise InvalidToken("invalid_token", "the subscribe token is malformed") from None
    signed = False
    for key in keys:
        signed |= hmac.compare_digest(mac, _mac(key, payload))
    if not signed:
        raise InvalidToken("invalid_token", "the subscribe token's signature does not match")
    try:
        claims = json.loads(_b64decode(payload))
        expires_at = claims["exp"]
        sids = [claims["sid"]] if "sid" in claims else claims["sids"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise InvalidToken("invalid_token", "the subscribe token is malformed") from None
    if (
        not isinstance(sids, list)
        or not all(isinstance(one, str) for one in sids)
        or not isinstance(expires_at, int)
    ):
        raise InvalidToken("invalid_token", "the subscribe token is malformed")
    if expires_at <= now:
        raise InvalidToken("token_expired", "the subscribe token has expired")
    return SubscribeClaims(frozenset(sids), expires_at)


def verify_subscribe_token(keys: Sequence[str], token: str, sid: str, now: float) -> SubscribeGrant:
    """The grant of ``token`` for ``sid`` at ``now``; raises :class:`InvalidToken`."""
    claims = read_subscribe_token(keys, token, now)
    if sid not in claims.sids:
        raise InvalidToken("wrong_session", "the subscribe token is for another session")
    return SubscribeGrant(sid, claims.expires_at)
