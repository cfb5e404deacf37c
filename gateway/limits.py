"""How many event clients (SSE and WebSocket) one gateway process serves, per session and in all.

A client is admitted before its feed starts and counted until its connection ends; one over a
limit is refused at once with a status the client can act on: 429 when its session has too
many clients here, 503 when this gateway is full (another replica may have room). A multiplexed
connection (``/v1/stream``) counts once towards the gateway's total, and each session it follows
once towards that session's clients.
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

    def __init__(self, limits: ClientLimits, sid: str | None, *, counted: bool) -> None:
        self._limits = limits
        self._sid = sid
        self._counted = counted
        self._held = True

    def release(self) -> None:
        """Idempotent."""
        if self._held:
            self._held = False
            self._limits._leave(self._sid, counted=self._counted)

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
        self._check_total()
        self._check_session(sid)
        return self._take(sid, counted=True)

    def admit_connection(self) -> Admission:
        """Take a place for a multiplexed connection (its sessions are admitted one by one
        with :meth:`admit_session`); raises :class:`ClientLimitReached`."""
        self._check_total()
        return self._take(None, counted=True)

    def admit_session(self, sid: str) -> Admission:
        """Take a place among ``sid``'s clients for a session of a multiplexed connection;
        raises :class:`ClientLimitReached`."""
        self._check_session(sid)
        return self._take(sid, counted=False)

    def _check_total(self) -> None:
        if self._count >= self.total:
            raise ClientLimitReached(
                503,
                "gateway_full",
                f"this gateway serves its maximum of {self.total} clients (LP_MAX_CLIENTS); "
                "retry later or on another gateway",
            )

    def _check_session(self, sid: str) -> None:
        if self._by_session.get(sid, 0) >= self.per_session:
            raise ClientLimitReached(
                429,
                "too_many_clients",
                f"session {sid!r} has its maximum of {self.per_session} clients on this "
                "gateway (LP_MAX_CLIENTS_PER_SESSION)",
            )

    def _take(self, sid: str | None, *, counted: bool) -> Admission:
        if sid is not None:
            self._by_session[sid] = self._by_session.get(sid, 0) + 1
        if counted:
            self._count += 1
        return Admission(self, sid, counted=counted)

    def _leave(self, sid: str | None, *, counted: bool) -> None:
        if counted:
            self._count -= 1
        if sid is None:
            return
        left = self._by_session[sid] - 1
        if left:
            self._by_session[sid] = left
        else:
            del self._by_session[sid]
