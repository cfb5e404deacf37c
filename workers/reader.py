"""One session's upstream reader: connect, parse, publish, back off, and never give up.

The reader owns no task besides the one running :meth:`Reader.run`; stopping it means cancelling
that task, which aborts the upstream connection on the way out. The connection itself is an
:class:`~workers.http1.Http1Protocol` opened by the worker's
:class:`~workers.upstream.UpstreamClient`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from listenerpool.backoff import reconnect_delay
from listenerpool.envelope import envelope_parts
from listenerpool.errors import (
    NotOwner,
    StreamError,
    UpstreamError,
    UpstreamNotAllowed,
    UpstreamRejected,
    UpstreamStatus,
)
from listenerpool.logs import redact_url
from listenerpool.metrics import ReconnectReason, WorkerMetrics
from listenerpool.scripts import Scripts
from listenerpool.settings import Settings
from listenerpool.shardsub import REDIS_ERRORS
from listenerpool.sse import SSEEvent, SSEParser
from workers.http1 import Http1Protocol, UpstreamBroken
from workers.publisher import Publisher
from workers.renewal import release_many
from workers.session import HeldSession
from workers.upstream import UpstreamClient

log = logging.getLogger(__name__)

# Statuses worth retrying; any other 4xx means the request itself is wrong.
RETRYABLE_4XX = frozenset({408, 429})
# A connection whose first this-many lines name no SSE field is not an event stream.
GARBAGE_LINES = 64
REPORT_RETRY_S = 1.0  # a state report Redis did not take is sent again with bytes after this
POSITION_MOVED = -3  # publish reply: the history is past the seq the reader knows


class PositionMoved(StreamError):
    """A publish found the history ahead of the reader's position: reconnect from Redis's."""


#: Called with the session and the epoch the caller saw when Redis answered "spec gone"; True
#: when the session is held again (``session.epoch`` is then the epoch to write with).
Restore = Callable[[HeldSession, int], Awaitable[bool]]


class Reader:
    """Reads one session's upstream until cancelled, or until the upstream rejects it for good.

    ``run`` returns after a permanent failure (recorded as ``failed`` in the session state,
    lease released), when a publish is refused (:class:`NotOwner`) and after a bug (the
    session handed back). When Redis has lost the session's keys, ``restore`` (the worker's
    re-assertion) is asked to write them back before the reader goes on; without it, that too
    is :class:`NotOwner`. ``on_exit`` is called with the reader as ``run`` ends, however.
    Every other problem (network, 5xx, malformed stream, Redis unreachable) is retried with
    full-jitter backoff for as long as the task lives.
    """

    def __init__(
        self,
        session: HeldSession,
        *,
        redis: Any,
        scripts: Scripts,
        publisher: Publisher,
        reporter: Publisher,
        upstream: UpstreamClient,
        settings: Settings,
        rand: Callable[[float, float], float] = random.uniform,
        metrics: WorkerMetrics | None = None,
        restore: Restore | None = None,
        on_exit: Callable[[Reader], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self._clock = clock
        self._on_exit = on_exit
        self._restore = restore
        self._redis = redis
        self._scripts = scripts
        self._publisher = publisher
        self._reporter = reporter  # the worker's batcher of report.lua calls
        self._upstream = upstream
        self._settings = settings
        self._rand = rand
        self._retry_ms: int | None = None
        self._metrics = metrics if metrics is not None else WorkerMetrics()
        self._connected: asyncio.Event | None = None  # made when asked for: few ever are
        self._stream: Http1Protocol | None = None  # the current upstream connection
        self._unreported: dict[str, str | int] | None = None  # state fields Redis did not take
        self._report_retry_at = 0.0
        #: ``connecting``, ``listening`` or ``backoff`` (what ``listenerpool_listeners`` counts).
        self.state = "connecting"

    @property
    def connected(self) -> asyncio.Event:
        """Set while the reader listens to an upstream that answered with an event stream."""
        if self._connected is None:
            self._connected = asyncio.Event()
            if self._stream is not None and self.state == "listening":
                self._connected.set()
        return self._connected

    async def run(self) -> None:
        """Read until cancelled; never raises anything else. A refused publish
        (:class:`NotOwner`) ends it with a warning, a permanent failure with the session
        ``failed``, and a bug with the session handed back, so that one reader cannot take the
        worker's others down with it. One frame for all of it: every idle listener keeps it."""
        s = self.session
        attempt = 0
        try:
            while True:
                delivered = False
                floor_s: float | None = None
                try:
                    delivered = await self._listen_once()
                    error, reason = "upstream closed the stream", ReconnectReason.EOF
                except (UpstreamRejected, UpstreamNotAllowed) as exc:
                    await self._fail(str(exc))
                    return
                except UpstreamError as exc:
                    error, reason = str(exc), _status_reason(exc)
                    floor_s = exc.retry_after
                except PositionMoved as exc:
                    # A re-sent publish found its batch applied: a Redis connection error's echo.
                    error, reason = str(exc), ReconnectReason.REDIS_ERROR
                except StreamError as exc:
                    error, reason = f"malformed stream: {exc}", ReconnectReason.PROTOCOL_ERROR
                except UpstreamBroken as exc:  # connect, TLS, timeouts, HTTP framing, redirects
                    error, reason = str(exc), exc.reason
                except REDIS_ERRORS as exc:
                    error = f"redis unavailable: {type(exc).__name__}: {exc}"
                    reason = ReconnectReason.REDIS_ERROR
                    self._metrics.redis_error["reader"].inc()
                finally:
                    if self._connected is not None:
                        self._connected.clear()
                _end_if_stopping()
                if delivered:
                    attempt = 0
                retry_ms = self._retry_ms
                if floor_s is not None:
                    retry_ms = max(retry_ms or 0, int(floor_s * 1000))
                delay = reconnect_delay(
                    attempt,
                    base=self._settings.backoff_base,
                    cap=self._settings.backoff_cap,
                    server_retry_ms=retry_ms,
                    rand=self._rand,
                )
                attempt += 1
                self._metrics.reconnects[reason].inc()
                self._metrics.backoff_seconds.inc(delay)
                self.state = "backoff"
                log.info(
                    "session %s: backoff: %s; reconnecting in %.2fs (attempt %d)",
                    s.sid,
                    error,
                    delay,
                    attempt,
                    extra={"state": "backoff", "reason": reason.value, "attempt": attempt},
                )
                await self._report(state="backoff", retries=attempt, last_error=error)
                await asyncio.sleep(delay)

        except NotOwner as exc:
            log.warning("session %s: %s; reader stopped", s.sid, exc)
        except Exception:
            log.exception("session %s: reader crashed; handing the session back", s.sid)
            try:
                held = [(s.keys, s.lease_value)]
                await release_many(self._redis, self._scripts, held, "handoff", "reader crashed")
            except Exception as exc:
                log.warning("session %s: release failed (lease will lapse): %s", s.sid, exc)
        finally:
            if self._on_exit is not None:
                self._on_exit(self)

    async def _listen_once(self) -> bool:
        """One connection. Returns whether it delivered any event; raises on every failure."""
        s = self.session
        # The resume point is read from Redis, not from memory: a publish whose reply was lost
        # may still have been applied, and Redis alone knows -- unless Redis lost the state
        # (every held session's state names its epoch), when memory is all there is. Right
        # after the adoption, which read it with the lease, no such publish can exist.
        if s.position_fresh:
            s.position_fresh = False
        else:
            last_id, seq, epoch = await self._redis.hmget(s.keys.state, "last_id", "seq", "epoch")
            if epoch is None:
                await self._restore_or_stop(s.epoch)
            else:
                applied = int(seq or 0)
                if applied > s.seq:
                    # Published without its reply reaching us (lost, or this reader's
                    # predecessor stopped while waiting for it): remember those events too, or
                    # a re-assertion after a data loss would write the history back without them.
                    await self._remember_applied(applied)
                s.last_id = _text(last_id)
                s.seq = applied
        last_id = s.last_id
        parser = SSEParser(max_event_bytes=self._settings.max_event_bytes, last_event_id=last_id)
        delivered = False
        self.state = "connecting"
        _end_if_stopping()
        stream = await self._upstream.open(
            s.spec.url, _request_headers(s.spec.headers, last_id), before_connect=self._may_connect
        )
        self._stream = stream
        try:
            check_response(await stream.head())
            await self._report(state="listening", retries=0, last_error="")
            self.state = "listening"
            log.info(
                "session %s: listening to %s (resuming after id %r)",
                s.sid,
                redact_url(s.spec.url),
                last_id,
                extra={"state": "listening"},
            )
            if self._connected is not None:
                self._connected.set()
            published, latency = self._metrics.events_published, self._metrics.publish_latency
            while True:
                chunk = stream.take()
                if chunk is None:
                    await stream.readable()  # a bare future: no coroutine kept while idle
                    continue
                if not chunk:
                    break
                received = time.perf_counter()
                await self._retry_report()
                events = parser.feed(chunk)
                self._retry_ms = parser.retry
                if events:
                    await self._publish(events)
                    published.inc(len(events))
                    latency.observe(time.perf_counter() - received)
                    delivered = True
                elif not delivered and parser.ignored_lines >= GARBAGE_LINES:
                    raise StreamError(
                        f"{parser.ignored_lines} lines without any SSE field and no event: "
                        "the upstream is not sending an event stream"
                    )
        finally:
            self._stream = None
            stream.abort()
        return delivered

    async def _remember_applied(self, seq: int) -> None:
        """Add the events Redis holds above ``session.seq`` up to ``seq`` to the session's
        memory of recent events, from the history."""
        s = self.session
        keep = self._settings.restore_events
        if keep <= 0:
            return
        entries = await self._redis.xrevrange(s.keys.events, count=min(seq - s.seq, keep))
        s.remember_history(entries, keep, after=s.seq, upto=seq)

    def _may_connect(self) -> None:
        """Refuse a connection once the lease clock ran out. The worker fences such a reader,
        but a process woken from a freeze runs the I/O that was ready (the reply this reader
        awaited) before its fence loop's timer: this reader would connect while the session's
        new owner, whom the lapsed lease let in, reads it too."""
        if self.session.clock.must_fence(self._clock()):
            raise UpstreamBroken(
                "no lease renewal confirmed within LP_LEASE_TTL - LP_LEASE_MARGIN; not connecting",
                ReconnectReason.LEASE_UNCONFIRMED,
            )

    def sever(self) -> None:
        """Shut the upstream connection down now, before the task unwinds: a busy or just
        woken event loop may take a while to run the cancellation, and a fenced reader's
        lease is about to be someone else's."""
        stream = self._stream
        if stream is not None:
            stream.abort()

    async def _publish(self, events: list[SSEEvent]) -> None:
        s = self.session
        while True:
            epoch = s.epoch
            args: list[str | int] = [
                s.lease_value,
                epoch,
                self._settings.history_maxlen,
                int(self._settings.history_ttl * 1000),
                events[-1].id,
                s.seq,
            ]
            for event in events:
                head, tail = envelope_parts(epoch, event.type, event.data, event.id)
                args += [event.type, event.data, event.id, head, tail]
            seq = await self._publisher.call(
                [s.keys.lease, s.keys.spec, s.keys.state, s.keys.events, s.keys.live], args
            )
            if seq >= 0:
                s.seq, s.last_id = seq, events[-1].id
                s.remember(
                    seq - len(events) + 1,
                    epoch,
                    [(e.type, e.data, e.id) for e in events],
                    self._settings.restore_events,
                )
                return
            if seq == POSITION_MOVED:
                # This batch (or one before it) was applied although its reply was lost: read
                # the position from Redis again and resume from there.
                raise PositionMoved(f"session {s.sid}: history is past seq {s.seq}")
            if s.epoch != epoch:
                continue  # re-asserted at a new epoch while this call was on its way
            # "Not the owner" may also mean a re-assertion landed just before this call and its
            # reply is not in yet: the restore step tells (and refuses a reader truly fenced).
            await self._restore_or_stop(epoch)

    async def _restore_or_stop(self, seen_epoch: int) -> None:
        """The session is gone from Redis or not ours at ``seen_epoch``: have the worker
        re-assert it (a no-op when it already did), or stop with :class:`NotOwner`."""
        s = self.session
        if self._restore is None or not await self._restore(s, seen_epoch):
            raise NotOwner(f"session {s.sid}: lease or epoch {seen_epoch} is no longer ours")

    async def _report(self, **fields: str | int) -> None:
        """Record state fields if we still own the lease; a Redis outage is not fatal here."""
        s = self.session
        if isinstance(fields.get("state"), str):
            s.phase = str(fields["state"])
        args: list[str | int] = [s.lease_value]
        for name, value in fields.items():
            args += [name, value]
        try:
            written = await self._reporter.call([s.keys.lease, s.keys.state], args)
        except REDIS_ERRORS as exc:
            self._metrics.redis_error["reader"].inc()
            log.debug("session %s: state not recorded: %s", s.sid, exc)
            written = 0
        if written:
            self._unreported = None
            return
        # Reports are made on changes only: left unsent, Redis would show the old state (say
        # "connecting" from the adoption, or from a write-back after a data loss that raced
        # this report) for as long as this connection lasts. A reader that is truly no longer
        # the owner is stopped by its next publish or renewal; until then a retry costs one
        # refused call a second.
        self._unreported = {**(self._unreported or {}), **fields}
        self._report_retry_at = time.monotonic() + REPORT_RETRY_S

    async def _retry_report(self) -> None:
        """Send a report that Redis did not take, once its retry time has come."""
        if self._unreported is not None and time.monotonic() >= self._report_retry_at:
            await self._report(**self._unreported)

    async def _fail(self, reason: str) -> None:
        s = self.session
        self.state = "failed"
        log.warning("session %s: failed permanently: %s", s.sid, reason, extra={"state": "failed"})
        await release_many(self._redis, self._scripts, [(s.keys, s.lease_value)], "failed", reason)


def _end_if_stopping() -> None:
    """Raise CancelledError if the task has a stop request pending. A Redis call can swallow
    a cancellation (redis-py's wait_for may return the reply instead), or turn it into an error
    of its own; the stopper cancels again soon, but a fenced reader must not open a connection
    meanwhile (one did, right after a frozen worker woke, while the new owner's was open)."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError


def _request_headers(given: Mapping[str, str], last_id: str) -> dict[str, str]:
    headers = dict(given)
    headers["Accept"] = "text/event-stream"
    headers["Cache-Control"] = "no-cache"
    if last_id:
        headers["Last-Event-ID"] = last_id
    return headers


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class ResponseHead(Protocol):
    """What :func:`check_response` reads of a response: its status and its headers."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


def check_response(response: ResponseHead) -> None:
    """Raise the error a response head other than a 200 event stream means: permanent for
    204 and for 4xx other than 408/429, retryable (with any ``Retry-After``) otherwise."""
    status = response.status_code
    if status == 204:
        raise UpstreamRejected("upstream answered 204 No Content: the stream is over")
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        raise UpstreamRejected(f"upstream rejected the request: HTTP {status}")
    if status != 200:
        raise UpstreamStatus(
            f"upstream answered HTTP {status}",
            permanent=False,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
    content_type = response.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "text/event-stream":
        raise UpstreamError(
            f"upstream sent content type {content_type or 'none'!r}, not text/event-stream",
            permanent=False,
        )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta seconds or an HTTP date), if it parses."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _status_reason(exc: UpstreamError) -> ReconnectReason:
    """A retryable non-200 status, or a 200 that is not an event stream."""
    if isinstance(exc, UpstreamStatus):
        return ReconnectReason.HTTP_STATUS
    return ReconnectReason.PROTOCOL_ERROR
