"""One session's upstream reader: connect, parse, publish, back off, and never give up.

A reader runs a task only while it has work: connecting (up to the response head), and
publishing the bytes that came in. An idle listener is its connection (an
:class:`~workers.http1.Http1Protocol` opened by the worker's
:class:`~workers.upstream.UpstreamClient`), which calls the reader back when bytes, an end or
its idle timeout come; a reader backing off is one loop timer. :meth:`Reader.stop` ends whichever
it is, the upstream connection closed first.
"""

from __future__ import annotations

import asyncio
import contextvars
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
from listenerpool.replies import reply_text
from listenerpool.scripts import Scripts
from listenerpool.settings import Settings
from listenerpool.shardsub import REDIS_ERRORS
from listenerpool.sse import SSEEvent, SSEParser
from listenerpool.tasks import cancel_until_done
from workers.http1 import Http1Protocol, UpstreamBroken
from workers.publisher import Publisher
from workers.renewal import release_many
from workers.session import HeldSession, recent_limit
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


class StreamEnded(Exception):
    """The upstream ended its response cleanly."""


class Reader:
    """Reads one session's upstream from :meth:`start` until :meth:`stop`, or until the
    upstream rejects it for good.

    It ends by itself after a permanent failure (recorded as ``failed`` in the session state,
    lease released), when a publish is refused (:class:`NotOwner`) and after a bug (the
    session handed back). When Redis has lost the session's keys, ``restore`` (the worker's
    re-assertion) is asked to write them back before the reader goes on; without it, that too
    is :class:`NotOwner`. ``on_exit`` is called with the reader as it ends, however. Every
    other problem (network, 5xx, malformed stream, Redis unreachable) is retried with
    full-jitter backoff for as long as the reader lives. Its tasks and timers run in
    ``context`` (None: a copy of the caller's).
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
        context: contextvars.Context | None = None,
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
        self._context = context
        self._connected: asyncio.Event | None = None  # made when asked for: few ever are
        self._stream: Http1Protocol | None = None  # the current upstream connection
        self._parser: SSEParser | None = None  # the current connection's
        self._delivered = False  # the current connection published an event
        self._attempt = 0  # connections since the last one that delivered
        self._task: asyncio.Task[None] | None = None  # connecting or publishing, else None
        self._timer: asyncio.TimerHandle | None = None  # the backoff's
        self._stopping = False
        self._finished = False
        self._ended: asyncio.Future[None] | None = None  # made by run(), the one who waits
        self._unreported: dict[str, str | int] | None = None  # state fields Redis did not take
        self._report_retry_at = 0.0
        #: ``connecting``, ``listening`` or ``backoff`` (what ``listenerpool_listeners``
        #: counts); ``failed`` or ``stopped`` once it ended.
        self.state = "connecting"

    @property
    def connected(self) -> asyncio.Event:
        """Set while the reader listens to an upstream that answered with an event stream."""
        if self._connected is None:
            self._connected = asyncio.Event()
            if self._stream is not None and self.state == "listening":
                self._connected.set()
        return self._connected

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect (in a task of its own, which ends once the reader listens)."""
        if self._context is None:
            self._context = contextvars.copy_context()
        self._spawn(self._connect)

    async def stop(self) -> None:
        """End the reader: its connection is closed, its backoff timer cancelled and its task
        (if one runs) cancelled and awaited before this returns. Idempotent."""
        if not self._stopping:
            self._stopping = True
            # The socket first, before the task unwinds: a busy or just woken event loop may
            # take a while to run the cancellation, and a fenced reader's lease is about to be
            # someone else's.
            self._let_go()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            await cancel_until_done(task)
        self._finish()

    async def run(self) -> None:
        """Start, and wait until the reader ends; cancelling this stops it."""
        self._ended = asyncio.get_running_loop().create_future()
        self.start()
        try:
            await asyncio.shield(self._ended)
        finally:
            await self.stop()

    def _spawn(self, step: Callable[[], Awaitable[None]]) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._phase(step), name=f"reader:{self.session.sid}", context=self._context
        )

    def _reconnect(self) -> None:
        """The backoff timer's callback."""
        self._timer = None
        if not self._stopping:
            self._spawn(self._connect)

    def _on_readable(self) -> None:
        """The idle connection's callback: bytes, an end, or the idle timeout came."""
        if not self._stopping and self._task is None:
            self._spawn(self._take_all)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = self._stopping = True
        if self.state != "failed":
            self.state = "stopped"
        self._let_go()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        if self._on_exit is not None:
            self._on_exit(self)

    async def _phase(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run one step (connect, or take what came in); what ends the connection decides
        what is next: a backoff timer, or the reader's end. Never raises anything but
        CancelledError: a refused publish (:class:`NotOwner`) ends the reader with a warning,
        a permanent failure with the session ``failed``, and a bug with the session handed
        back, so that one reader cannot take the worker's others down with it."""
        s = self.session
        try:
            floor_s: float | None = None
            try:
                await step()
                return  # listening, with nothing left to take: the connection calls back
            except StreamEnded:
                error, reason = "upstream closed the stream", ReconnectReason.EOF
            except (UpstreamRejected, UpstreamNotAllowed) as exc:
                self._close_stream()
                await self._fail(str(exc))
                self._finish()
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
            self._close_stream()
            self._end_if_stopping()
            await self._back_off(error, reason, floor_s)
        except NotOwner as exc:
            log.warning("session %s: %s; reader stopped", s.sid, exc)
            self._finish()
        except asyncio.CancelledError:
            self._finish()
            raise
        except Exception:
            log.exception("session %s: reader crashed; handing the session back", s.sid)
            self._close_stream()
            try:
                held = [(s.keys, s.lease_value)]
                await release_many(self._redis, self._scripts, held, "handoff", "reader crashed")
            except Exception as exc:
                log.warning("session %s: release failed (lease will lapse): %s", s.sid, exc)
            finally:
                self._finish()
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    def _let_go(self) -> None:
        """Cancel the backoff timer and close the connection, whichever the reader has."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_stream()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()
        if self._connected is not None:
            self._connected.clear()

    async def _back_off(self, error: str, reason: ReconnectReason, floor_s: float | None) -> None:
        s = self.session
        if self._delivered:
            self._attempt = 0
        retry_ms = self._retry_ms
        if floor_s is not None:
            retry_ms = max(retry_ms or 0, int(floor_s * 1000))
        delay = reconnect_delay(
            self._attempt,
            base=self._settings.backoff_base,
            cap=self._settings.backoff_cap,
            server_retry_ms=retry_ms,
            rand=self._rand,
        )
        self._attempt += 1
        attempt = self._attempt
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
        due = asyncio.get_running_loop().time() + delay  # counted from the error, not the report
        await self._report(state="backoff", retries=attempt, last_error=error)
        self._end_if_stopping()
        self._timer = asyncio.get_running_loop().call_at(
            due, self._reconnect, context=self._context
        )

    def _end_if_stopping(self) -> None:
        """Raise CancelledError if the reader is being stopped. A Redis call can swallow a
        cancellation (redis-py's wait_for may return the reply instead), or turn it into an
        error of its own; the stopper cancels again soon, but a fenced reader must not open a
        connection or set a timer meanwhile (one did, right after a frozen worker woke, while
        the new owner's was open)."""
        current = asyncio.current_task()
        if self._stopping or (current is not None and current.cancelling()):
            raise asyncio.CancelledError

    # -- the steps ---------------------------------------------------------------------------
    async def _connect(self) -> None:
        """Open a connection and wait for its head; then take what came with it."""
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
                s.last_id = reply_text(last_id)
                s.seq = applied
        last_id = s.last_id
        self._parser = SSEParser(
            max_event_bytes=self._settings.max_event_bytes, last_event_id=last_id
        )
        self._delivered = False
        self.state = "connecting"
        self._end_if_stopping()
        stream = await self._upstream.open(
            s.spec.url, _request_headers(s.spec.headers, last_id), before_connect=self._may_connect
        )
        self._stream = stream
        if self._stopping:  # stopped while the connection opened: stop() found none to close
            raise asyncio.CancelledError
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
        await self._take_all()

    async def _take_all(self) -> None:
        """Parse and publish what the connection has received; when it has nothing more,
        ask it to call back and return. Raises what ended the connection."""
        stream, parser = self._stream, self._parser
        assert stream is not None and parser is not None, "taking from no connection"
        published, latency = self._metrics.events_published, self._metrics.publish_latency
        while True:
            chunk = stream.take()
            if chunk is None:
                stream.notify(self._on_readable)
                return
            if not chunk:
                raise StreamEnded
            received = time.perf_counter()
            await self._retry_report()
            events = parser.feed(chunk)
            self._retry_ms = parser.retry
            if events:
                await self._publish(events)
                published.inc(len(events))
                latency.observe(time.perf_counter() - received)
                self._delivered = True
            elif not self._delivered and parser.ignored_lines >= GARBAGE_LINES:
                raise StreamError(
                    f"{parser.ignored_lines} lines without any SSE field and no event: "
                    "the upstream is not sending an event stream"
                )

    async def _remember_applied(self, seq: int) -> None:
        """Add the events Redis holds above ``session.seq`` up to ``seq`` to the session's
        memory of recent events, from the history."""
        s = self.session
        limit = recent_limit(self._settings)
        if limit.keeps_none:
            return
        entries = await self._redis.xrevrange(s.keys.events, count=min(seq - s.seq, limit.events))
        s.remember_history(entries, limit, after=s.seq, upto=seq)

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
                    recent_limit(self._settings),
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


def _request_headers(given: Mapping[str, str], last_id: str) -> dict[str, str]:
    headers = dict(given)
    headers["Accept"] = "text/event-stream"
    headers["Cache-Control"] = "no-cache"
    if last_id:
        headers["Last-Event-ID"] = last_id
    return headers


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
