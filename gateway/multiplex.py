"""The sessions of one multiplexed connection, whatever its transport.

Each followed session runs its own :class:`~gateway.feed.SessionFeed` (its gap-free join: history,
then live, catch-up after lost pub/sub) in a task that puts its frames in the connection's
*outbox*, a short queue the transport's sender empties in order. The live queues of all the
connection's sessions share one :class:`~gateway.hub.QueueBudget` (the size of one client's
queue): when the sender falls behind, the outbox fills, the feeds wait, their live queues grow,
and past the budget :attr:`Multiplex.overflowed` is set and the transport ends the connection.

A subscription the client may not have (unknown session, forbidden, a token that is not valid, a
limit reached, already followed) becomes an ``error`` frame for that session; the others go on.
Redis failing sets :attr:`Multiplex.failed`: the transport ends the connection, and the client
resumes by position.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gateway.auth import StreamAccess, token_access
from gateway.errors import ApiError
from gateway.feed import ClientTooSlow, Frame, SessionFeed
from gateway.hub import HubUnavailable
from gateway.limits import Admission, ClientLimitReached
from gateway.state import GatewayState
from gateway.streamproto import error_frame, subscribed_frame, unsubscribed_frame
from listenerpool.keys import SessionKeys
from listenerpool.shardsub import REDIS_ERRORS
from listenerpool.tasks import cancel_until_done

log = logging.getLogger(__name__)

OUTBOX_FRAMES = 64  # frames waiting for the sender; beyond, the sessions' feeds wait


@dataclass(frozen=True, slots=True)
class Control:
    """A control frame's JSON text (subscribed, unsubscribed, error)."""

    text: str


@dataclass(frozen=True, slots=True)
class SessionFrame:
    """A frame of one session's feed: an event or a reset."""

    sid: str
    frame: Frame


Outgoing = Control | SessionFrame


@dataclass(slots=True)
class _Following:
    sid: str
    feed: SessionFeed
    admission: Admission
    task: asyncio.Task[None] | None = None


class Multiplex:
    """The sessions one connection follows. :meth:`aclose` stops them all."""

    def __init__(self, state: GatewayState, access: StreamAccess) -> None:
        self._state = state
        self._access = access
        self._budget = state.hub.budget()
        self.limit = state.settings.max_sessions_per_stream
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue(OUTBOX_FRAMES)
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        self._following: dict[str, _Following] = {}
        self._leaving: list[_Following] = []  # stopped but not yet out of the hub

    @property
    def overflowed(self) -> asyncio.Event:
        """Set when the connection fell behind its sessions' live events."""
        return self._budget.overflowed

    @property
    def sids(self) -> list[str]:
        return list(self._following)

    async def subscribe(self, sid: str, after: int, token: str | None = None) -> None:
        """Follow ``sid`` from seq ``after`` (exclusive), opened by the connection's
        credentials or by ``token``; a refusal is an ``error`` frame."""
        refusal = self._refusal(sid, token)
        if refusal is not None:
            await self.outbox.put(Control(error_frame(sid, *refusal)))
            return
        try:
            admission = self._state.clients.admit_session(sid)
        except ClientLimitReached as exc:
            await self.outbox.put(Control(error_frame(sid, exc.code, exc.message)))
            return
        state = self._state
        feed = SessionFeed(state.hub, state.redis, sid, after, self._budget)
        following = _Following(sid, feed, admission)
        self._following[sid] = following
        following.task = asyncio.create_task(self._follow(following, after), name=f"mux-{sid}")

    async def unsubscribe(self, sid: str) -> None:
        following = self._following.pop(sid, None)
        if following is None:
            await self.outbox.put(
                Control(error_frame(sid, "not_subscribed", f"session {sid!r} is not followed"))
            )
            return
        await self._stop(following)
        await self.outbox.put(Control(unsubscribed_frame(sid)))

    async def aclose(self) -> None:
        followings = [*self._following.values(), *self._leaving]
        self._following.clear()
        for following in followings:
            await self._stop(following)

    def _refusal(self, sid: str, token: str | None) -> tuple[str, str] | None:
        if sid in self._following:
            return "already_subscribed", f"session {sid!r} is already followed here"
        access = self._access
        if token is not None:
            try:
                access = token_access(self._state.settings, token)
            except ApiError as exc:
                return exc.code, exc.message
        if not access.allows(sid):
            return "forbidden", f"the subscribe token does not name session {sid!r}"
        if len(self._following) >= self.limit:
            return (
                "too_many_sessions",
                f"this connection follows its maximum of {self.limit} sessions "
                "(LP_MAX_SESSIONS_PER_STREAM)",
            )
        return None

    async def _follow(self, following: _Following, after: int) -> None:
        sid = following.sid
        try:
            if not await self._state.redis.exists(SessionKeys(sid).spec):
                if self._following.get(sid) is following:
                    del self._following[sid]
                    following.admission.release()
                await self.outbox.put(
                    Control(error_frame(sid, "unknown_session", f"session {sid!r} does not exist"))
                )
                return
            await following.feed.__aenter__()
            await self.outbox.put(Control(subscribed_frame(sid, after)))
            async for frame in following.feed.frames():
                await self.outbox.put(SessionFrame(sid, frame))
        except ClientTooSlow:
            pass  # the shared budget's overflow ends the connection
        except (*REDIS_ERRORS, HubUnavailable) as exc:
            self.failure = exc
            self.failed.set()
        except Exception as exc:  # a bug: end the connection (the client resumes) and say so
            log.exception("following session %r failed", sid)
            self.failure = exc
            self.failed.set()

    async def _stop(self, following: _Following) -> None:
        """Stop a session's feed and take it out of the hub (also after an interrupted stop:
        it stays in ``_leaving`` until it is out)."""
        if following not in self._leaving:
            self._leaving.append(following)
        if following.task is not None:
            await cancel_until_done(following.task)
        await following.feed.__aexit__(None, None, None)
        following.admission.release()
        self._leaving.remove(following)
