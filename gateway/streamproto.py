"""The multiplexed stream's wire format, as pure functions: many sessions over one connection.

Client to gateway (WebSocket text frames, JSON):

- ``{"op": "subscribe", "sid": "a", "after": 12, "token": "..."}`` (``after`` optional, default
  0; ``token`` optional: a subscribe token naming ``a``, for a session the connection's own
  credentials do not open)
- ``{"op": "unsubscribe", "sid": "a"}``

Gateway to client (WebSocket text frames, or SSE ``data:``):

- an event: the session's envelope with ``sid`` first,
  ``{"sid", "seq", "epoch", "event", "data", "id"}``;
- a control frame, with ``op``: ``subscribed`` (``sid``, ``after``), ``unsubscribed`` (``sid``),
  ``reset`` (``sid``, ``after``, ``first_seq``: events ``after+1 .. first_seq-1`` are gone) and
  ``error`` (``sid`` or null, ``code``, ``message``).

Over SSE the sessions are named in the URL, ``?sessions=a,b:12`` (a session, optionally with
the seq after which to start), and every event's ``id:`` is a *position id*: the seq reached by
every session of the stream, in the URL's order, so the ``Last-Event-ID`` a browser sends on
reconnecting resumes all of them. It reads ``<tag>.<seq>.<seq>...``: the seqs in base 36, and
``tag``, 8 hex digits of a hash of the session list, so that an id is never applied to another
list. Session ids (``[A-Za-z0-9._-]{1,128}``) contain neither ``,`` nor ``:``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from listenerpool.auth import MAX_TOKEN_CHARS
from listenerpool.keys import SESSION_ID_PATTERN

MAX_SEQ = 10**18 - 1  # the most digits a seq may be given with (as after= on one session)
_SEQ_CHARS = 12  # len(base36(MAX_SEQ))
TAG_CHARS = 8
MAX_FRAME_CHARS = MAX_TOKEN_CHARS + 4096  # a subscribe frame, its token included
HEADERS_ROOM = 16 * 1024  # the request line's method and path, and ordinary headers


class StreamError(Exception):
    """A client's mistake: ``code`` names it (a 400 over HTTP, an ``error`` frame over WS)."""

    def __init__(self, code: str, message: str, sid: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.sid = sid


# -- client frames ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Subscribe:
    sid: str
    after: int = 0
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    sid: str


ClientFrame = Subscribe | Unsubscribe


def check_sid(sid: object) -> str:
    if not isinstance(sid, str) or not SESSION_ID_PATTERN.match(sid):
        raise StreamError(
            "invalid_session_id",
            f"a session id is 1 to 128 of A-Z a-z 0-9 . _ -, not {str(sid)[:140]!r}",
        )
    return sid


def check_after(after: object, sid: str | None = None) -> int:
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= MAX_SEQ:
        raise StreamError("invalid_after", f"after must be a seq number, not {after!r}", sid)
    return after


def parse_client_frame(text: str | bytes | None) -> ClientFrame:
    """A client's frame; raises :class:`StreamError` (``bad_frame`` or a field's code)."""
    if not isinstance(text, str):
        raise StreamError("bad_frame", "frames are JSON text frames")
    if len(text) > MAX_FRAME_CHARS:
        raise StreamError("bad_frame", f"a frame is at most {MAX_FRAME_CHARS} characters")
    try:
        obj = json.loads(text)
    except ValueError:
        raise StreamError("bad_frame", "a frame is a JSON object") from None
    if not isinstance(obj, dict):
        raise StreamError("bad_frame", "a frame is a JSON object")
    op = obj.get("op")
    raw_sid = obj.get("sid")
    sid = raw_sid if isinstance(raw_sid, str) else None
    if op not in ("subscribe", "unsubscribe"):
        raise StreamError("bad_frame", f"op is 'subscribe' or 'unsubscribe', not {op!r}", sid)
    if "sid" not in obj:
        raise StreamError("bad_frame", f"{op} needs a sid")
    sid = check_sid(raw_sid)
    fields = {"op", "sid", "after", "token"} if op == "subscribe" else {"op", "sid"}
    unknown = set(obj) - fields
    if unknown:
        raise StreamError("bad_frame", f"unknown field(s) of {op}: {sorted(unknown)}", sid)
    if op == "unsubscribe":
        return Unsubscribe(sid)
    token = obj.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        raise StreamError("bad_frame", "token is a subscribe token (a string)", sid)
    return Subscribe(sid, check_after(obj.get("after", 0), sid), token)


# -- gateway frames --------------------------------------------------------------------------
def event_frame(sid: str, envelope: str) -> str:
    """An envelope's JSON text with ``sid`` prepended (no re-serialisation of the envelope)."""
    if not envelope.startswith("{"):
        raise ValueError(f"not an envelope: {envelope[:40]!r}")
    return f'{{"sid":{json.dumps(sid)},{envelope[1:]}'


def subscribed_frame(sid: str, after: int) -> str:
    return json.dumps({"op": "subscribed", "sid": sid, "after": after})


def unsubscribed_frame(sid: str) -> str:
    return json.dumps({"op": "unsubscribed", "sid": sid})


def reset_frame(sid: str, after: int, first_seq: int) -> str:
    return json.dumps({"op": "reset", "sid": sid, "after": after, "first_seq": first_seq})


def error_frame(sid: str | None, code: str, message: str) -> str:
    return json.dumps({"op": "error", "sid": sid, "code": code, "message": message})


# -- SSE: the session list and the position id -----------------------------------------------
def parse_sessions(value: str | None, limit: int) -> list[tuple[str, int]]:
    """``a,b:12,c`` as ``[(sid, after), ...]``; raises :class:`StreamError`."""
    if not value:
        raise StreamError("invalid_sessions", "name the sessions to follow: ?sessions=a,b:12")
    parts = value.split(",")
    if len(parts) > limit:
        raise StreamError(
            "too_many_sessions",
            f"at most {limit} sessions per stream (LP_MAX_SESSIONS_PER_STREAM), not {len(parts)}",
        )
    result: list[tuple[str, int]] = []
    seen: set[str] = set()
    for part in parts:
        sid, colon, after_text = part.partition(":")
        check_sid(sid)
        after = 0
        if colon:
            if not after_text.isdigit() or len(after_text) > 18:
                raise StreamError(
                    "invalid_after", f"{sid}:<after> needs a seq number, not {after_text!r}", sid
                )
            after = int(after_text)
        if sid in seen:
            raise StreamError("invalid_sessions", f"session {sid!r} is named twice", sid)
        seen.add(sid)
        result.append((sid, after))
    return result


def max_request_head_bytes(sessions: int) -> int:
    """The largest request head an SSE stream of ``sessions`` sessions may need: the session
    list (the longest ids, each with a seq and percent-encoded separators), a subscribe token
    naming them all (at most ``MAX_TOKEN_CHARS``), the longest ``Last-Event-ID``, and room
    for everything else."""
    per_session = 128 + 3 + 18 + 3  # an id, ":" as %3A, a seq, "," as %2C
    return HEADERS_ROOM + sessions * per_session + MAX_TOKEN_CHARS + max_position_id_chars(sessions)


def list_tag(sids: list[str]) -> str:
    """The hash naming an ordered session list in a position id."""
    return hashlib.sha256(",".join(sids).encode()).hexdigest()[:TAG_CHARS]


def max_position_id_chars(sessions: int) -> int:
    """The longest position id of a stream of ``sessions`` sessions."""
    return TAG_CHARS + sessions * (1 + _SEQ_CHARS)


def encode_position_id(tag: str, positions: list[int]) -> str:
    """The id of a stream whose sessions (in order) have reached ``positions``."""
    return ".".join([tag, *(_base36(seq) for seq in positions)])


def decode_position_id(text: str, tag: str, sessions: int) -> list[int]:
    """The positions of a stream of ``sessions`` sessions listed as ``tag`` names them;
    raises :class:`StreamError` (``invalid_last_event_id``)."""
    if len(text) > max_position_id_chars(sessions):
        raise _bad_id("it is too long for this session list")
    head, *seqs = text.split(".")
    if head != tag:
        raise _bad_id("it was not issued for this session list (in this order)")
    if len(seqs) != sessions:
        raise _bad_id(f"it holds {len(seqs)} positions for {sessions} sessions")
    positions = []
    for seq in seqs:
        if not seq or len(seq) > _SEQ_CHARS or not _is_base36(seq):
            raise _bad_id(f"{seq!r} is not a position")
        value = int(seq, 36)
        if value > MAX_SEQ:
            raise _bad_id(f"{seq!r} is not a position")
        positions.append(value)
    return positions


def _bad_id(why: str) -> StreamError:
    return StreamError("invalid_last_event_id", f"Last-Event-ID is not a position id: {why}")


_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _is_base36(text: str) -> bool:
    return all(c in _DIGITS for c in text)


def _base36(value: int) -> str:
    if value < 0:
        raise ValueError("a position is not negative")
    if value == 0:
        return "0"
    digits = []
    while value:
        value, rem = divmod(value, 36)
        digits.append(_DIGITS[rem])
    return "".join(reversed(digits))
