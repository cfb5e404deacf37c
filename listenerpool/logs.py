"""Log output of the pool's processes: console lines or JSON lines, with context fields.

Context fields come from two places: ``extra=`` on a call, and :func:`log_context`, which binds
fields (``worker``, ``session``, ``epoch``) to the current task and the tasks it creates. A
worker binds ``worker`` for its whole run and each reader's context (its tasks and timers run
in it) binds its session and epoch, so every line a reader logs carries all three without
repeating them at each call.

Secrets: upstream request headers are never logged, and URLs are logged through
:func:`redact_url`, which hides credentials and query values.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

__all__ = [
    "AccessQueryFilter",
    "ConsoleFormatter",
    "ContextFilter",
    "JsonFormatter",
    "LogFormat",
    "bind_log_context",
    "configure_logging",
    "log_context",
    "redact_server_logs",
    "redact_url",
    "some_of",
]

LogFormat = Literal["json", "console"]
REDACTED: Final = "***"
SHOWN_NAMES: Final = 10  # sessions a line about a batch names; each has a DEBUG line of its own
#: Libraries whose INFO/DEBUG lines carry full upstream URLs (query tokens included) or request
#: details, one line per request: kept at WARNING whatever the pool's level.
QUIET_LOGGERS: Final = ("httpx", "httpcore", "hpack")

_context: contextvars.ContextVar[Mapping[str, object] | None] = contextvars.ContextVar(
    "listenerpool_log_context", default=None
)
# Attributes every LogRecord has; anything else on a record came from extra= or the context.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add ``fields`` to every line logged in this block, by this task and tasks it starts."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: object) -> None:
    """Add ``fields`` for the rest of the current task (a task's context is its own copy)."""
    _context.set({**(_context.get() or {}), **fields})


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record; a field given with ``extra=`` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if key not in record.__dict__:
                record.__dict__[key] = value
        return True


def context_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's fields beyond the standard ones (from ``extra=`` and the context)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, the
    context fields, and ``exc`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in context_fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = context_fields(record)
        if not fields:
            return text
        suffix = " ".join(f"{key}={value}" for key, value in fields.items())
        head, newline, rest = text.partition("\n")  # keep a traceback below the line
        return f"{head} [{suffix}]{newline}{rest}"


class AccessQueryFilter(logging.Filter):
    """Hides query values in uvicorn's request lines (the access line's target and the
    WebSocket ``[accepted]`` line's path): a client's query string may carry a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_redact_target(a) if isinstance(a, str) else a for a in args)
        return True


def _redact_target(value: str) -> str:
    path, sep, query = value.partition("?")
    if not sep or not path.startswith("/"):
        return value
    return f"{path}?{_redact_query(query)}"


def redact_server_logs() -> None:
    """Install :class:`AccessQueryFilter` on uvicorn's loggers (idempotent; the filters
    survive uvicorn re-configuring its loggers)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, AccessQueryFilter) for f in logger.filters):
            logger.addFilter(AccessQueryFilter())


def configure_logging(level: str, fmt: LogFormat = "console") -> None:
    """Log to stderr at ``level`` in ``fmt``, replacing the root logger's handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    redact_server_logs()


def redact_url(url: str) -> str:
    """``url`` with any user:password and every query value replaced by ``***``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return REDACTED
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    if parts.username is not None or parts.password is not None:
        netloc = f"{REDACTED}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_query(parts.query), ""))


def _redact_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    return "&".join(f"{quote(name, safe='')}={REDACTED}" for name, _ in pairs)


def some_of(names: Sequence[str], shown: int = SHOWN_NAMES) -> str:
    """The first ``shown`` of ``names``, comma-separated, for a line about a batch: an INFO
    line per session would cost a worker taking thousands over a tenth of its CPU."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")
