"""Sans-I/O parser for ``text/event-stream`` bodies.

Implements the WHATWG HTML "event stream interpretation" rules: feed raw bytes as they
arrive, get back the events those bytes completed. The parser does no I/O and never
blocks; one instance parses one upstream connection.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from listenerpool.errors import EventTooLarge

__all__ = ["SSEEvent", "SSEParser"]

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = 0x0A
_COLON = 0x3A


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event.

    ``type`` is the ``event`` field, or ``"message"`` when none (or an empty one) was given;
    ``data`` is the ``data`` lines joined with ``"\\n"``; ``id`` is the last event ID in
    force when the event was dispatched (``""`` if none).
    """

    type: str
    data: str
    id: str


_KNOWN_FIELDS = frozenset({b"data", b"event", b"id", b"retry"})


class SSEParser:
    """Incremental event-stream parser for one connection.

    Contract:

    * ``feed(chunk)`` accepts any split of the byte stream (inside CRLF pairs, inside
      multi-byte UTF-8 characters) and returns exactly the events the chunk completed, in
      order. Re-chunking the same bytes never changes the result.
    * Lines end with CRLF, LF or CR. A leading UTF-8 BOM is skipped once. Invalid UTF-8 is
      decoded to U+FFFD.
    * An event still pending when the stream ends is never dispatched; there is no flush.
    * ``last_event_id`` is the WHATWG "last event ID string": it changes only when a blank
      line is processed, so an ``id:`` whose event never completed is not reported as seen.
      Pass it back as ``last_event_id=`` to the parser of the next connection.
    * A line longer than ``max_event_bytes`` bytes (terminator excluded, buffered or not),
      or an event whose data exceeds ``max_event_bytes`` UTF-8 bytes, raises
      :class:`~listenerpool.errors.EventTooLarge`. Events completed earlier in that same
      chunk are not returned, and ``last_event_id`` is left as it was before the call so
      that resuming from it loses nothing. Discard the parser after this error.
    """

    __slots__ = (
        "_after_cr",
        "_at_start",
        "_data",
        "_data_len",
        "_event",
        "_id_buffer",
        "_last_event_id",
        "_max",
        "_pending",
        "_pending_len",
        "_retry",
        "ignored_lines",
    )

    def __init__(self, max_event_bytes: int = 1 << 20, *, last_event_id: str = "") -> None:
        """Create a parser; ``last_event_id`` seeds the id a reconnecting reader resumes from."""
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be positive, got {max_event_bytes}")
        self._max = max_event_bytes
        # The WHATWG last event ID buffer persists across reconnections, so a seed fills both
        # the buffer (what the next event gets) and the string (what Last-Event-ID reports).
        self._id_buffer = last_event_id
        self._last_event_id = last_event_id
        self._retry: int | None = None
        self._data: list[bytes] = []
        self._data_len = 0  # UTF-8 bytes of the data buffer, one LF per data line included
        self._event = b""
        self._pending: list[bytes] = []  # pieces of the current unterminated line
        self._pending_len = 0
        self._after_cr = False  # the last chunk ended with CR: a leading LF is its pair
        self._at_start = True
        # Lines naming no known field. WHATWG says to ignore them, but a stream of nothing else
        # is not an event stream at all; readers use this count to say so.
        self.ignored_lines = 0

    @property
    def last_event_id(self) -> str:
        """The value to send as ``Last-Event-ID`` when reconnecting."""
        return self._last_event_id

    @property
    def pending_line_bytes(self) -> int:
        """Bytes of the unterminated line held for the next chunk; at most ``max_event_bytes``
        whenever :meth:`feed` has returned."""
        return self._pending_len

    @property
    def pending_data_bytes(self) -> int:
        """Bytes of the unfinished event's data (lines joined by LF); at most
        ``max_event_bytes`` whenever :meth:`feed` has returned."""
        return max(self._data_len - 1, 0)

    @property
    def retry(self) -> int | None:
        """The last valid ``retry:`` value in milliseconds, or ``None`` if none was seen."""
        return self._retry

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk`` and return the events it completed (possibly none)."""
        if self._after_cr and chunk:
            self._after_cr = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            if chunk:
                self._pending.append(chunk)
                self._pending_len += len(chunk)
                if self._pending_len > self._max:
                    raise self._too_large("line")
            return []

        # Splitting only up to the last terminator leaves the unterminated tail for later;
        # CR, LF never occur inside a UTF-8 sequence, so splitting bytes before decoding is
        # safe however the chunks fall.
        block = chunk[: end + 1]
        if self._pending:
            block = b"".join(self._pending) + block
            self._pending = []
            self._pending_len = 0
        tail = chunk[end + 1 :]
        if tail:
            if len(tail) > self._max:
                raise self._too_large("line")
            self._pending.append(tail)
            self._pending_len = len(tail)
        elif chunk[end] == _CR:
            self._after_cr = True

        lines = block.splitlines()  # bytes.splitlines splits on exactly CRLF, LF and CR
        if self._at_start:
            self._at_start = False
            # Checked before the BOM goes so the limit is the same however the stream is split.
            if len(lines[0]) > self._max:
                raise self._too_large("line")
            lines[0] = lines[0].removeprefix(_BOM)

        committed_id = self._last_event_id
        try:
            return self._process(lines)
        except EventTooLarge:
            self._last_event_id = committed_id
            raise

    def _process(self, lines: list[bytes]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        limit = self._max
        for line in lines:
            if not line:
                self._dispatch(events)
                continue
            if len(line) > limit:
                raise self._too_large("line")
            if line[0] == _COLON:
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
                self._data_len += len(value) + 1
                if self._data_len - 1 > limit:
                    raise self._too_large("event's data")
            elif name == b"event":
                self._event = value
            elif name == b"id" and b"\0" not in value:
                self._id_buffer = value.decode("utf-8", "replace")
            elif name == b"retry" and value.isdigit():  # bytes.isdigit(): ASCII only, b"" false
                # int() refuses over ~4300 significant digits; such a value is ignored like
                # any other unusable one.
                with contextlib.suppress(ValueError):
                    self._retry = int(value.lstrip(b"0") or b"0")
            elif name not in _KNOWN_FIELDS:
                self.ignored_lines += 1
        return events

    def _dispatch(self, events: list[SSEEvent]) -> None:
        self._last_event_id = self._id_buffer
        if self._data:
            events.append(
                SSEEvent(
                    type=self._event.decode("utf-8", "replace") if self._event else "message",
                    data=b"\n".join(self._data).decode("utf-8", "replace"),
                    id=self._last_event_id,
                )
            )
            self._data = []
            self._data_len = 0
        self._event = b""

    def _too_large(self, what: str) -> EventTooLarge:
        return EventTooLarge(
            f"SSE {what} exceeds max_event_bytes={self._max} bytes; "
            "the stream cannot be parsed within the limit"
        )
