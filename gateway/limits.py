"""How many event clients (SSE and WebSocket) one gateway process serves, per session and in all.

A client is admitted before its feed starts and counted until its connection ends; one over a
limit is refused at once with a status the client can act on: 429 when its session has too
many clients here, 503 when this gateway is full (another replica may have room).
"""

from __future__ import annotations

from types import TracebackType


class ClientLimitReached(Exception):
    """A client was refused; ``status`` is the HTTP status (WebSockets close with 4000 + it)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Admission:
    """One admitted client; leaving the ``with`` block (or :meth:`release`) frees its place."""

    def __init__(self, limits: ClientLimits, sid: str) -> None:
        self._limits = limits
        self._sid = sid
        self._held = True

    def release(self) -> None:
        """Idempotent."""
        if self._held:
            self._held = False
            self._limits._leave(self._sid)

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class ClientLimits:
    """Counts this process's event clients by session (single event loop, no locking)."""

    def __init__(self, *, per_session: int, total: int) -> None:
        self.per_session = per_session
        self.total = total
        self._by_session: dict[str, int] = {}
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def clients_of(self, sid: str) -> int:
        return self._by_session.get(sid, 0)

    def admit(self, sid: str) -> Admission:
        """Take a place for a client of ``sid``; raises :class:`ClientLimitReached`."""
        if self._count >= self.total:
            raise ClientLimitReached(
                503,
                "gateway_full",
                f"this gateway serves its maximum of {self.total} clients (LP_MAX_CLIENTS); "
                "retry later or on another gateway",
            )
        current = self._by_session.get(sid, 0)
        if current >= self.per_session:
            raise ClientLimitReached(
                429,
                "too_many_clients",
                f"session {sid!r} has its maximum of {self.per_session} clients on this "
                "gateway (LP_MAX_CLIENTS_PER_SESSION)",
            )
        self._by_session[sid] = current + 1
        self._count += 1
        return Admission(self, sid)

    def _leave(self, sid: str) -> None:
        self._count -= 1
        left = self._by_session[sid] - 1
        if left:
            self._by_session[sid] = left
        else:
            del self._by_session[sid]
