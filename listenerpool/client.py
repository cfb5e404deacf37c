"""An async client of the gateway for backends: the control API over HTTP (httpx) and
sessions' events over a WebSocket (websockets), resumed by seq across any disconnection.

::

    async with PoolClient("http://gateway:8080", token="...") as pool:
        await pool.start("run-42", "https://agent.example/events/run-42")
        async with pool.events("run-42") as stream:
            async for item in stream:
                if isinstance(item, Reset):
                    ...  # events item.after+1 .. item.first_seq-1 are gone from the history
                else:
                    handle(item.seq, item.event, item.data)

:meth:`PoolClient.events` yields each event once, in seq order, without gaps: when the
connection drops (network, gateway restart, or close code 1013 "client too slow") it reconnects
after a jittered backoff with ``after=<last seq>`` and skips anything it already yielded. Only a
refusal (unknown session, bad request, auth) ends the stream, as :class:`PoolClientError`.
Transport failures of the control calls surface as httpx exceptions.

:meth:`PoolClient.stream` follows several sessions over one WebSocket (``/v1/stream``) with the
same guarantees per session; each item's ``sid`` says whose it is::

    async with pool.stream(["run-42", "run-43"]) as stream:
        async for item in stream:
            print(item.sid, item.seq)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.http11 import Response

from listenerpool.backoff import reconnect_delay as jittered_delay
from listenerpool.errors import InvalidSessionId, ListenerPoolError
from listenerpool.keys import check_session_id

__all__ = ["Event", "EventStream", "MultiStream", "PoolClient", "PoolClientError", "Reset"]

#: Close codes 4000 + HTTP status that the gateway uses to refuse a subscription.
_CLOSE_NAMES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "unknown_session",
}
_CLOSE_TIMEOUT: Final = 5.0
#: start_many's requests: sessions per request (the gateway's default LP_MAX_BATCH) and JSON
#: bytes per body (under the gateway's default LP_MAX_BODY_BYTES, 64 KiB).
BATCH_SESSIONS: Final = 1000
BATCH_BYTES: Final = 60_000
#: A session refused in a /v1/stream ``error`` frame: the HTTP status the refusal stands for.
#: Codes not listed (too_many_clients: this gateway is full for now) are retried.
_FRAME_REFUSALS: Final = {
    "unknown_session": 404,
    "forbidden": 403,
    "invalid_token": 401,
    "token_expired": 401,
    "invalid_session_id": 400,
    "invalid_after": 400,
    "too_many_sessions": 400,
    "bad_frame": 400,
}


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a session: ``seq`` numbers the session's events from 1 without gaps,
    ``epoch`` is the publishing reader's fencing epoch, ``event``/``data``/``id`` are the
    upstream's event type, payload (verbatim) and event id."""

    seq: int
    epoch: int
    event: str
    data: str
    id: str
    sid: str = ""  #: whose event (set by :meth:`PoolClient.stream` and :meth:`~.events`)


@dataclass(frozen=True, slots=True)
class Reset:
    """Events ``after + 1 .. first_seq - 1`` were trimmed from the history before this client
    read them; the stream continues with ``first_seq``."""

    after: int
    first_seq: int
    sid: str = ""


class PoolClientError(ListenerPoolError):
    """The gateway refused a request: ``status`` is the HTTP status (for a WebSocket closed with
    code 4000 + N, N), ``code`` and ``message`` come from its ``{"error": {...}}`` body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _error_from(status: int, body: bytes | str, fallback: str) -> PoolClientError:
    """Parse ``{"error": {"code", "message"}}``, or describe the response as best we can."""
    try:
        error = json.loads(body)["error"]
        return PoolClientError(status, str(error["code"]), str(error["message"]))
    except (ValueError, TypeError, KeyError):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return PoolClientError(status, f"http_{status}", text.strip()[:200] or fallback)


def _parsed_error(status: int, body: bytes) -> PoolClientError | None:
    """The error of a body that is the gateway's JSON error, else None."""
    error = _error_from(status, body, "")
    return None if error.code == f"http_{status}" else error


def _session_path(sid: str) -> str:
    """``/v1/sessions/{sid}``; an invalid id is refused here as the gateway would (400)."""
    try:
        check_session_id(sid)
    except InvalidSessionId as exc:
        raise PoolClientError(400, "invalid_session_id", str(exc)) from None
    return f"/v1/sessions/{quote(sid, safe='')}"


class PoolClient:
    """A gateway's control API and event streams. Use as an async context manager, or call
    :meth:`aclose`, which also closes the WebSockets of open :meth:`events` iterators."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        ws_scheme = "wss" if parts.scheme == "https" else "ws"
        self._ws_base = urlunsplit((ws_scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout
        )
        self._sockets: set[ClientConnection] = set()
        self._closed = asyncio.Event()

    async def __aenter__(self) -> PoolClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client and every open event WebSocket; open iterators then end."""
        self._closed.set()
        sockets = list(self._sockets)
        self._sockets.clear()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        await self._http.aclose()

    # -- control -----------------------------------------------------------------------------
    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error_from(response.status_code, response.content, response.reason_phrase)
        return response

    async def start(
        self, sid: str, url: str, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Listen to ``sid`` at ``url`` (idempotent): ``{"sid", "outcome", "epoch"}``, outcome
        one of created, claimed, unchanged, updated, pending."""
        body = {"url": url, "headers": dict(headers or {})}
        response = await self._call("PUT", _session_path(sid), json=body)
        result: dict[str, Any] = response.json()
        return result

    async def start_many(
        self, sessions: Sequence[Mapping[str, Any]], *, per_request: int = BATCH_SESSIONS
    ) -> list[dict[str, Any]]:
        """:meth:`start` for many sessions, ``{"sid", "url", "headers"?}`` each, in requests of
        ``per_request`` sessions (at most the gateway's ``LP_MAX_BATCH``) and at most
        ``BATCH_BYTES`` of JSON (the gateway's default ``LP_MAX_BODY_BYTES`` is 64 KiB): the
        results in order. A request the gateway refuses raises; those before it stand."""
        if per_request < 1:
            raise ValueError("per_request must be at least 1")
        results: list[dict[str, Any]] = []
        for batch in _batches(sessions, per_request, BATCH_BYTES):
            response = await self._call("PUT", "/v1/sessions", json={"sessions": batch})
            results += response.json()["results"]
        return results

    async def cancel(self, sid: str) -> None:
        """Stop listening to ``sid`` fleet-wide; an unknown session raises (404)."""
        await self._call("DELETE", _session_path(sid))

    async def status(self, sid: str) -> dict[str, Any]:
        """The session's state, owner, epoch, seq, retries, last error, ..."""
        response = await self._call("GET", _session_path(sid))
        result: dict[str, Any] = response.json()
        return result

    async def sessions(self, *, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        """A page of sessions, most recently updated first: ``{"sessions", "total",
        "next_offset"}`` (``next_offset`` None on the last page)."""
        params = {"offset": offset, "limit": limit}
        response = await self._call("GET", "/v1/sessions", params=params)
        result: dict[str, Any] = response.json()
        return result

    async def workers(self) -> dict[str, Any]:
        """Registered workers: ``{"workers": [{"id", "capacity", "load", "host", "pid",
        "heartbeat_age_s"}]}``."""
        response = await self._call("GET", "/v1/workers")
        result: dict[str, Any] = response.json()
        return result

    async def subscribe_token(self, sid: str, ttl: float | None = None) -> dict[str, Any]:
        """A token that lets a browser follow ``sid`` for ``ttl`` seconds (the gateway's
        default when None): ``{"sid", "token", "expires_at"}``. Needs ``LP_SIGNING_KEY`` on
        the gateway (409 otherwise)."""
        body = {} if ttl is None else {"ttl": ttl}
        response = await self._call("POST", _session_path(sid) + "/subscribe-token", json=body)
        result: dict[str, Any] = response.json()
        return result

    # -- events ------------------------------------------------------------------------------
    def events(
        self,
        sid: str,
        *,
        after: int = 0,
        reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 5.0,
    ) -> EventStream:
        """The session's events with seq > ``after``, as :class:`Event` (and :class:`Reset`
        notices), each once and in order, across reconnections. Iterate it; close it with
        ``aclose()``, ``async with``, or by breaking out of the loop."""
        if after < 0:
            raise ValueError("after must be >= 0")
        if reconnect_delay <= 0 or max_reconnect_delay < reconnect_delay:
            raise ValueError("need 0 < reconnect_delay <= max_reconnect_delay")
        cursor = _Cursor(after)
        return EventStream(cursor, self._follow(sid, cursor, reconnect_delay, max_reconnect_delay))

    async def _follow(
        self, sid: str, cursor: _Cursor, base: float, cap: float
    ) -> AsyncGenerator[Event | Reset, None]:
        path = _session_path(sid)
        attempt = 0
        while not self._closed.is_set():
            ws = await self._open(sid, f"{self._ws_base}{path}/events?after={cursor.seq}")
            if ws is not None:
                try:
                    while True:
                        item = _parse(await ws.recv(), sid)
                        if isinstance(item, Reset):
                            if item.first_seq - 1 <= cursor.seq:
                                continue
                            cursor.seq = item.first_seq - 1
                        elif item is None or item.seq <= cursor.seq:
                            continue  # not ours to show, or already yielded
                        elif item.seq > cursor.seq + 1:
                            break  # a gap the gateway did not announce: re-read the history
                        else:
                            cursor.seq = item.seq
                        attempt = 0
                        yield item
                except ConnectionClosed as exc:
                    if exc.rcvd is not None and 4400 <= exc.rcvd.code < 4500:
                        status = exc.rcvd.code - 4000
                        name = _CLOSE_NAMES.get(status, f"http_{status}")
                        raise PoolClientError(status, name, exc.rcvd.reason) from None
                finally:
                    self._sockets.discard(ws)
                    with contextlib.suppress(Exception):
                        await ws.close()
            delay = jittered_delay(attempt, base=base, cap=cap)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)

    def stream(
        self,
        sids: Sequence[str],
        *,
        after: Mapping[str, int] | None = None,
        reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 5.0,
    ) -> MultiStream:
        """Several sessions' events over one WebSocket: for each session, the events with seq
        > ``after[sid]`` (default 0) as :class:`Event` (and :class:`Reset` notices), each once
        and in order, across reconnections; ``item.sid`` tells whose. A session the gateway
        refuses (unknown, not in the token, ...) ends the stream as :class:`PoolClientError`."""
        wanted = list(sids)
        if not wanted:
            raise ValueError("name at least one session")
        if len(set(wanted)) != len(wanted):
            raise ValueError("a session is named twice")
        for sid in wanted:
            _session_path(sid)  # refuses an invalid id as the gateway would
        after = dict(after or {})
        if any(value < 0 for value in after.values()):
            raise ValueError("after must be >= 0")
        if reconnect_delay <= 0 or max_reconnect_delay < reconnect_delay:
            raise ValueError("need 0 < reconnect_delay <= max_reconnect_delay")
        positions = {sid: after.get(sid, 0) for sid in wanted}
        items = self._follow_many(positions, reconnect_delay, max_reconnect_delay)
        return MultiStream(positions, items)

    async def _follow_many(
        self, positions: dict[str, int], base: float, cap: float
    ) -> AsyncGenerator[Event | Reset, None]:
        attempt = 0
        while not self._closed.is_set():
            ws = await self._open(next(iter(positions)), f"{self._ws_base}/v1/stream")
            if ws is not None:
                try:
                    for sid, seq in positions.items():
                        await ws.send(json.dumps({"op": "subscribe", "sid": sid, "after": seq}))
                    while True:
                        item = _stream_item(await ws.recv())
                        if item is None or item.sid not in positions:
                            continue
                        last = positions[item.sid]
                        if isinstance(item, Reset):
                            if item.first_seq - 1 <= last:
                                continue
                            positions[item.sid] = item.first_seq - 1
                        elif item.seq <= last:
                            continue  # already yielded
                        elif item.seq > last + 1:
                            break  # a gap the gateway did not announce: re-read the history
                        else:
                            positions[item.sid] = item.seq
                        attempt = 0
                        yield item
                except ConnectionClosed as exc:
                    if exc.rcvd is not None and 4400 <= exc.rcvd.code < 4500:
                        status = exc.rcvd.code - 4000
                        name = _CLOSE_NAMES.get(status, f"http_{status}")
                        raise PoolClientError(status, name, exc.rcvd.reason) from None
                except _Retry:
                    pass
                finally:
                    self._sockets.discard(ws)
                    with contextlib.suppress(Exception):
                        await ws.close()
            delay = jittered_delay(attempt, base=base, cap=cap)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)

    async def _open(self, sid: str, url: str) -> ClientConnection | None:
        """A connected WebSocket, or None after a failure worth retrying."""
        try:
            ws = await connect(
                url,
                additional_headers=self._headers,
                open_timeout=self.timeout,
                close_timeout=min(self.timeout, _CLOSE_TIMEOUT),
                max_size=None,  # events may be up to LP_MAX_EVENT_BYTES, JSON-escaped
            )
        except InvalidStatus as exc:
            error = await self._refusal(sid, exc.response)
            if error is not None:
                raise error from None
            return None
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed):
            return None
        if self._closed.is_set():
            await ws.close()
            return None
        self._sockets.add(ws)
        return ws

    async def _refusal(self, sid: str, response: Response) -> PoolClientError | None:
        """The error of a refused handshake, or None when it is worth retrying (5xx, 429, or a
        refusal that the session's status does not explain)."""
        status = response.status_code
        if status >= 500 or status == 429:
            return None
        error = _parsed_error(status, bytes(response.body))
        if error is not None:
            return error
        if status != 403:
            return _error_from(status, bytes(response.body), response.reason_phrase)
        # A gateway that closes before accepting (unknown session, bad request) shows up as a
        # bare 403 from the ASGI server: the session's status says which.
        try:
            await self._call("GET", _session_path(sid))
        except PoolClientError as probe:
            return probe if probe.status < 500 and probe.status != 429 else None
        except httpx.HTTPError:
            return None
        return None


def _batches(
    sessions: Sequence[Mapping[str, Any]], count: int, size: int
) -> Iterator[list[dict[str, Any]]]:
    """``sessions`` in runs of at most ``count`` whose JSON stays within ``size`` bytes (a
    session larger than that goes alone: the gateway says what it makes of it)."""
    batch: list[dict[str, Any]] = []
    used = 0
    for session in sessions:
        item = {"sid": session["sid"], "url": session["url"]}
        if session.get("headers"):
            item["headers"] = dict(session["headers"])
        cost = len(json.dumps(item)) + 2
        if batch and (len(batch) == count or used + cost > size):
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += cost
    if batch:
        yield batch


@dataclass(slots=True)
class _Cursor:
    seq: int  # the last seq yielded (or skipped by a Reset)


class EventStream(AsyncIterator[Event | Reset]):
    """The iterator returned by :meth:`PoolClient.events`. ``last_seq`` is the position to
    resume from later (``events(sid, after=stream.last_seq)``)."""

    def __init__(self, cursor: _Cursor, items: AsyncGenerator[Event | Reset, None]) -> None:
        # The generator must not refer back to this object: dropping the stream after a
        # ``break`` then finalizes the generator (closing its WebSocket) right away.
        self._cursor = cursor
        self._items = items

    @property
    def last_seq(self) -> int:
        return self._cursor.seq

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event | Reset:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        """Stop following: closes the WebSocket."""
        await self._items.aclose()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class MultiStream(AsyncIterator[Event | Reset]):
    """The iterator returned by :meth:`PoolClient.stream`. ``positions`` is each session's
    last seq, to resume from later (``stream(sids, after=stream.positions)``)."""

    def __init__(
        self, positions: dict[str, int], items: AsyncGenerator[Event | Reset, None]
    ) -> None:
        self._positions = positions
        self._items = items

    @property
    def positions(self) -> dict[str, int]:
        return dict(self._positions)

    def __aiter__(self) -> MultiStream:
        return self

    async def __anext__(self) -> Event | Reset:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        """Stop following: closes the WebSocket."""
        await self._items.aclose()

    async def __aenter__(self) -> MultiStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Retry(Exception):
    """A /v1/stream refusal worth reconnecting for later."""


def _stream_item(message: str | bytes) -> Event | Reset | None:
    """A /v1/stream event or reset frame; None for anything else (ignored). An ``error`` frame
    raises: :class:`PoolClientError` for a refusal, :class:`_Retry` for a passing one."""
    if isinstance(message, bytes):
        return None
    try:
        obj = json.loads(message)
        if not isinstance(obj, dict):
            return None
        op, sid = obj.get("op"), obj.get("sid")
        if op == "error":
            code, text = str(obj["code"]), str(obj["message"])
            status = _FRAME_REFUSALS.get(code)
            if status is None:
                raise _Retry(code)
            raise PoolClientError(status, code, f"{sid}: {text}" if sid else text)
        if not isinstance(sid, str):
            return None
        if op == "reset":
            return Reset(int(obj["after"]), int(obj["first_seq"]), sid)
        if op is None:
            return _parse(message, sid, obj)
    except (ValueError, TypeError, KeyError):
        pass
    return None


def _parse(message: str | bytes, sid: str, parsed: Any = None) -> Event | Reset | None:
    """An envelope or a reset notice of ``sid``; None for anything else (ignored)."""
    if isinstance(message, bytes):
        return None
    try:
        obj = parsed if parsed is not None else json.loads(message)
        if not isinstance(obj, dict):
            return None
        if "seq" in obj:
            return Event(
                seq=int(obj["seq"]),
                epoch=int(obj["epoch"]),
                event=str(obj["event"]),
                data=str(obj["data"]),
                id=str(obj.get("id", "")),
                sid=sid,
            )
        if obj.get("type") == "reset":
            return Reset(after=int(obj["after"]), first_seq=int(obj["first_seq"]), sid=sid)
    except (ValueError, TypeError, KeyError):
        pass
    return None
