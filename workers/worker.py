"""The worker: hosts many readers on one asyncio loop and keeps their leases honest.

Background duties, all children of one TaskGroup: the job feed (rq), batched lease renewal and
heartbeat, the self-fence watchdog, the control-channel listener (cancel notices) and the
reconciler. Readers are not: each runs a task only while it connects or publishes, and the
worker stops them itself (on a failure too). Shutdown is the reverse of start-up: stop
taking jobs, hand every session to the rest of the fleet, deregister.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.exceptions
from rq import Queue

from listenerpool import index, keys
from listenerpool.connections import check_server
from listenerpool.control import SessionControl
from listenerpool.errors import InvalidInput
from listenerpool.lease import LeaseClock
from listenerpool.logs import bind_log_context, log_context, some_of
from listenerpool.metrics import WorkerMetrics
from listenerpool.replies import reply_text
from listenerpool.scripts import call_many
from listenerpool.settings import Settings
from listenerpool.shardsub import REDIS_ERRORS, ShardedSubscriber
from listenerpool.spec import UpstreamSpec
from listenerpool.tasks import cancel_until_done
from workers import registry
from workers.dispatch import JobFeed, ListenJob
from workers.publisher import Publisher
from workers.reader import Reader
from workers.reconciler import next_due_in, reconcile_once
from workers.renewal import RenewVerdict, release_all, release_many, renew_all
from workers.restore import reassert_all
from workers.script_channel import ScriptChannel
from workers.session import HeldSession, recent_limit
from workers.upstream import UpstreamClient

log = logging.getLogger(__name__)

RECONCILE_WAKE_JITTER = 0.1  # s after a lease deadline; spreads a fleet's reconcilers
RECONCILE_MIN_SLEEP = 0.05  # s between rounds, however many leases are due
RENEW_RETRY_DIVISOR = 5  # a failed renewal round is retried after interval / this
RECENT_BATCH = 100  # history reads per pipeline when a batch of sessions is adopted


class StopReason(StrEnum):
    CANCELLED = "cancelled"  # the session is no longer desired: release, state stopped
    LOST = "lost"  # the lease is someone else's or a newer epoch exists: release if still ours
    FENCED = "fenced"  # no renewal confirmed in time: stop before the lease can expire
    RECONNECT = "reconnect"  # the spec changed: restart the reader under the same lease


@dataclass(slots=True)
class RunningReader:
    session: HeldSession
    reader: Reader


class Worker:
    """A worker process's engine. ``redis`` (asyncio) and ``queue`` (rq, sync client) are
    owned by the caller; the upstream client (no connections of its own: each reader's
    stream is its own) is made from the settings unless given.

    ``lease_redis``, also the caller's, carries the lease renewals and the heartbeat on
    connections of their own, so that no burst of publishes, reports or claims queued for
    ``redis``'s connections delays a renewal round and fences readers whose leases are fine.
    Without it they share ``redis``."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis: Any,
        queue: Queue,
        lease_redis: Any | None = None,
        worker_id: str | None = None,
        upstream: UpstreamClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[float, float], float] = random.uniform,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id or settings.worker_id or registry.default_worker_id()
        self._redis = redis
        self._lease_redis = lease_redis if lease_redis is not None else redis
        self._control = SessionControl(redis, queue, settings)
        self._scripts = self._control.scripts
        # A round with no reply within a lease's lifetime is a dead connection, not a slow one.
        ttl = self.settings.lease_ttl
        self._publisher = Publisher(redis, self._scripts, reply_timeout=ttl)
        self._reporter = Publisher(
            redis, self._scripts, script=self._scripts.report, reply_timeout=ttl
        )
        #: Where renewal rounds go where the lease client allows it: a connection of their own
        #: (:class:`ScriptChannel`), on which a flush of 50 holds the loop the readers share
        #: about half as long as through a pipeline. Bounded like the rounds (_renew_loop).
        self.lease_channel = ScriptChannel.of(self._lease_redis, reply_timeout=settings.fence_after)
        self._lease_send = self.lease_channel.send if self.lease_channel is not None else None
        self._upstream = upstream or UpstreamClient.from_settings(settings)
        self._clock = clock
        self._rand = rand  # backoff jitter source, injectable for deterministic tests
        self._ttl_ms = int(settings.lease_ttl * 1000)
        self._readers: dict[str, RunningReader] = {}
        self._restore_lock = asyncio.Lock()
        self._restore_wanted: list[tuple[HeldSession, int, asyncio.Future[bool]]] = []
        self._tg: asyncio.TaskGroup | None = None
        self._feed = JobFeed(queue, self._adopt_many, self._spare_capacity)
        self._started = time.time()
        self.ready = asyncio.Event()
        #: This worker's metrics; ``metrics.registry`` is what its metrics port serves.
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.metrics.watch_listeners(self.listener_states)
        self._last_heartbeat: float | None = None  # monotonic time of the last confirmed round
        self._draining = False
        self._adopting = 0  # jobs taken whose adoption is under way
        self._kept_room = 0  # room a reconcile round keeps for the sessions it is claiming
        # Renewal rounds still under way a whole interval after they were sent: while there is
        # one, the worker takes no new session (see _hold_admission).
        self._late_rounds: set[asyncio.Task[bool]] = set()
        self._reconciling = asyncio.Lock()  # held by a reconcile round

    # -- public view -------------------------------------------------------------------------
    @property
    def load(self) -> int:
        return len(self._readers)

    def held_sessions(self) -> list[str]:
        return list(self._readers)

    def reader(self, sid: str) -> Reader | None:
        running = self._readers.get(sid)
        return running.reader if running else None

    def healthy(self) -> bool:
        """Serving, not draining, and its last renewal round (heartbeat included) confirmed
        within a lease TTL. Safe to call from another thread."""
        last = self._last_heartbeat
        return (
            self.ready.is_set()
            and not self._draining
            and self._tg is not None
            and last is not None
            and self._clock() - last < self.settings.lease_ttl
        )

    def listener_states(self) -> dict[str, int]:
        """How many readers are ``connecting``, ``listening`` and in ``backoff``."""
        # Runs on the metrics thread: list() copies the values without releasing the GIL.
        return dict(Counter(running.reader.state for running in list(self._readers.values())))

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain: every session moves to another worker."""
        with log_context(worker=self.worker_id):
            await self._run(stop)

    async def _run(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # Redis may come later; calls load on demand
            await check_server(self._redis)
            await self._scripts.preload(self._redis)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                feed = tg.create_task(self._feed.run(self._requeue), name="feed")
                duties = [
                    # Until every reader stopped (the drain below): they publish through it.
                    tg.create_task(self._publisher.run(), name="publisher"),
                    tg.create_task(self._reporter.run(), name="reporter"),
                    tg.create_task(self._renew_loop(), name="renew"),
                    tg.create_task(self._fence_loop(), name="fence"),
                    tg.create_task(self._control_loop(), name="control"),
                ]
                reconciler = tg.create_task(self._reconcile_loop(), name="reconcile")
                self.ready.set()
                log.info(
                    "worker %s up: capacity %d, lease ttl %gs",
                    self.worker_id,
                    self.settings.worker_capacity,
                    self.settings.lease_ttl,
                )
                await stop.wait()
                log.info("worker %s draining %d sessions", self.worker_id, self.load)
                self._draining = True
                self._feed.stop()
                # The feed finishes its job read first (a job taken is handled), unless Redis
                # cannot be reached: then the jobs stay in rq's intermediate list, whose sweep
                # puts them back, and the drain goes on.
                if not (await asyncio.wait([feed], timeout=self.settings.lease_ttl))[0]:
                    log.warning(
                        "job feed did not stop within %gs; draining", self.settings.lease_ttl
                    )
                    await cancel_until_done(feed)
                # A reconcile round under way finishes first: the sessions it adopts are
                # drained with the rest. None starts after.
                async with self._reconciling:
                    await cancel_until_done(reconciler)
                await self._drain()
                await asyncio.gather(*(cancel_until_done(task) for task in duties))
        finally:
            self._tg = None
            if self.lease_channel is not None:
                self.lease_channel.close()
            # Readers are no children of the group (an idle one is no task at all): those a
            # failure or a cancellation left running are stopped here, sockets closed.
            left = [running.reader for running in self._readers.values()]
            if left:
                await asyncio.gather(*(reader.stop() for reader in left))
            try:
                async with asyncio.timeout(2):
                    await registry.deregister(self._redis, self.worker_id)
            except (*REDIS_ERRORS, TimeoutError) as exc:
                log.warning("worker %s: could not deregister: %s", self.worker_id, exc)
            log.info("worker %s stopped", self.worker_id)

    async def _drain(self) -> None:
        """Stop every reader, give all leases back in pipelined rounds, and re-claim the
        sessions at once so other workers take their jobs without waiting for a TTL."""
        running = list(self._readers.values())
        await asyncio.gather(*(r.reader.stop() for r in running))
        sessions = [r.session for r in running]
        try:
            # Bounded: cut off from Redis, a draining worker must still exit; its leases lapse
            # within a ttl and the reconcilers move the sessions then.
            async with asyncio.timeout(self.settings.lease_ttl):
                await release_all(
                    self._redis, self._scripts, sessions, "handoff", "worker draining"
                )
                await self._control.reclaim_many([s.sid for s in sessions])
        except Exception as exc:
            # Released leases are due at once and others' reconcilers take them; unreleased
            # ones lapse within a TTL. Either way no session is lost.
            log.warning("hand-over incomplete (%s); reconcilers will finish it", exc)
        log.info("worker %s handed over %d sessions", self.worker_id, len(sessions))

    # -- jobs --------------------------------------------------------------------------------
    def _spare_capacity(self) -> int:
        """Room for more sessions: the job feed and the reconciler may both be adopting."""
        if self._draining or self._late_rounds:
            return 0
        taken = len(self._readers) + self._adopting + self._kept_room
        return self.settings.worker_capacity - taken

    def _keep_room(self) -> int:
        """Room for a reconcile round to keep for sessions it is about to claim, set aside until
        it adopts them: the round enqueues the rest of its claims first, and the job feed must
        not fill that room with one of them meanwhile."""
        self._kept_room = 0  # what an earlier round kept and did not adopt
        self._kept_room = max(0, self._spare_capacity())
        return self._kept_room

    async def _adopt_kept(self, jobs: list[ListenJob]) -> None:
        # No await between the two: the room passes from kept to adopting at once.
        self._kept_room = 0
        await self._adopt_many(jobs)

    async def _adopt_many(self, jobs: list[ListenJob]) -> None:
        """Adopt a batch of jobs, move the adopted sessions' lease index entries to their
        lease deadlines, then start their readers."""
        self._adopting += len(jobs)
        try:
            sessions = await self._adopt(jobs)
            if not sessions:
                return
            await self._track_adopted(sessions)
            await self._load_recent(sessions)
            one_line = len(sessions) > 1  # for the batch, not one per session
            await asyncio.gather(*(self._start_adopted(s, quiet=one_line) for s in sessions))
            if one_line:
                log.info(
                    "readers started for %d adopted sessions: %s",
                    len(sessions),
                    some_of([s.sid for s in sessions]),
                    extra={"state": "connecting", "count": len(sessions)},
                )
        finally:
            self._adopting -= len(jobs)
            self._feed.capacity_changed()

    async def _adopt(self, jobs: list[ListenJob]) -> list[HeldSession]:
        """Take the leases the jobs name, in one pipelined round (one per node on a cluster);
        the sessions now held. A job that is stale, cancelled or broken is dropped."""
        wanted: list[tuple[ListenJob, keys.SessionKeys]] = []
        for job in jobs:
            try:
                wanted.append((job, keys.SessionKeys(job.sid)))
            except InvalidInput:
                log.warning("dropping listen job with invalid session id %r", job.sid)
        if not wanted:
            return []
        replies: dict[int, Any] = {}

        def settled(positions: Sequence[int], answers: Sequence[Any]) -> None:
            replies.update(zip(positions, answers, strict=True))

        calls = [
            (
                [k.spec, k.lease, k.cancel, k.state],
                [job.token, job.epoch, self.worker_id, self._ttl_ms],
            )
            for job, k in wanted
        ]
        sent_at = self._clock()
        try:
            await call_many(self._redis, self._scripts.adopt, calls, settled)
        except REDIS_ERRORS as exc:
            # Those not answered were never ours; their leases lapse and the reconciler
            # claims them again. Those answered are adopted as usual.
            self.metrics.redis_error["adopt"].inc()
            answered = sum(not isinstance(reply, Exception) for reply in replies.values())
            failed = len(wanted) - answered
            log.warning("adopt failed for %d of %d sessions: %s", failed, len(wanted), exc)
        held = []
        for i, (job, k) in enumerate(wanted):
            reply = replies.get(i)
            if reply is None or isinstance(reply, Exception):
                continue
            session = await self._held_from(job, k, reply, sent_at)
            if session is not None:
                held.append(session)
        return held

    async def _held_from(
        self, job: ListenJob, k: keys.SessionKeys, reply: Any, sent_at: float
    ) -> HeldSession | None:
        """The session an adopt reply gives this worker; None when the job was dropped."""
        where = {"session": job.sid, "epoch": job.epoch}
        if int(reply[0]) != 1:
            log.debug(
                "session %s: dropping %s listen job", job.sid, reply_text(reply[1]), extra=where
            )
            return None
        lease_value = f"{self.worker_id}:{job.token}"
        url, headers_json = reply_text(reply[1]), reply_text(reply[2])
        last_id, seq = reply_text(reply[3]), int(reply_text(reply[4]) or 0)
        spec_rev = int(reply_text(reply[5]) or 0)
        clock = LeaseClock(confirmed_at=sent_at, fence_after=self.settings.fence_after)
        try:
            spec = UpstreamSpec.from_redis(url, headers_json)
        except (InvalidInput, ValueError) as exc:
            await self._release(k, lease_value, "failed", f"stored spec is invalid: {exc}")
            return None
        return HeldSession(
            k,
            job.token,
            job.epoch,
            lease_value,
            spec,
            clock,
            seq=seq,
            last_id=last_id,
            spec_rev=spec_rev,
            position_fresh=True,
        )

    async def _track_adopted(self, sessions: list[HeldSession]) -> None:
        """The claim left each session's index entry due when the *unadopted* lease would
        lapse (PENDING_TTL_FACTOR TTLs away); adopting cut the lease to one TTL. Left there
        until this worker's first renewal round, a worker dying before that round would leave
        its sessions unclaimed for up to that factor times the TTL instead of one TTL. Written
        before the readers start, so a reader's release (due now) is never overwritten."""
        try:
            await index.track(self._redis, self._scripts, {s.sid: self._ttl_ms for s in sessions})
        except REDIS_ERRORS as exc:
            # The entries stay due when the claims' leases would have lapsed: late, not lost.
            self.metrics.redis_error["adopt"].inc()
            log.warning("lease index not moved for %d adopted sessions: %s", len(sessions), exc)

    async def _start_adopted(self, session: HeldSession, *, quiet: bool = False) -> None:
        """Start the reader of an adopted session (logged at DEBUG when ``quiet``)."""
        stale = self._readers.get(session.sid)
        if stale is not None:
            # Redis let the session be claimed again while this worker still reads it: a
            # failover to a replica that lacked the lease, or a node restarted from an older
            # snapshot. The old reader no longer owns it. Left running it would be neither
            # renewed nor fenced (the registry names the new reader) and the upstream would see
            # two connections; it is stopped, its socket first, before the new one connects.
            log.warning(
                "session %s: adopted again at epoch %d while its reader at epoch %d ran; "
                "stopping that one first",
                session.sid,
                session.epoch,
                stale.session.epoch,
                extra=_where(session),
            )
            await stale.reader.stop()
        self._start_reader(session)
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "session %s: reader started at epoch %d",
            session.sid,
            session.epoch,
            extra={**_where(session), "state": "connecting"},
        )

    async def _load_recent(self, sessions: list[HeldSession]) -> None:
        """Start each session's memory of recent events from its history, so that what a
        re-assertion after a Redis data loss writes back reaches past this worker's take-over
        (clients a little behind then still find their events). One pipeline per
        ``RECENT_BATCH`` sessions (per node on a cluster), not a round trip each."""
        limit = recent_limit(self.settings)
        if limit.keeps_none:
            return
        with_history = [s for s in sessions if s.seq]
        for start in range(0, len(with_history), RECENT_BATCH):
            batch = with_history[start : start + RECENT_BATCH]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for session in batch:
                        pipe.xrevrange(session.keys.events, count=limit.events)
                    replies = await pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as exc:
                log.debug("recent history of %d sessions not loaded: %s", len(batch), exc)
                continue
            for session, entries in zip(batch, replies, strict=True):
                if isinstance(entries, Exception):
                    log.debug("session %s: recent history not loaded: %s", session.sid, entries)
                    continue
                session.remember_history(entries, limit, after=0, upto=session.seq)

    async def _requeue(self, job: ListenJob) -> None:
        """A job read while stopping goes back on the queue for another worker."""
        try:
            await self._control.enqueue(job.sid, job.token, job.epoch)
        except REDIS_ERRORS as exc:
            log.warning(
                "session %s: could not re-enqueue (reconciler will): %s",
                job.sid,
                exc,
                extra={"session": job.sid, "epoch": job.epoch},
            )

    # -- readers -----------------------------------------------------------------------------
    def _start_reader(self, session: HeldSession) -> None:
        assert self._tg is not None, "readers run only inside Worker.run"
        # The reader's tasks and timers run in a copy of the context holding its log fields.
        context = contextvars.copy_context()
        context.run(bind_log_context, session=session.sid, epoch=session.epoch)
        reader = Reader(
            session,
            redis=self._redis,
            scripts=self._scripts,
            publisher=self._publisher,
            reporter=self._reporter,
            upstream=self._upstream,
            settings=self.settings,
            rand=self._rand,
            metrics=self.metrics,
            restore=self.restore,
            on_exit=self._reader_ended,
            clock=self._clock,
            context=context,
        )
        self._readers[session.sid] = RunningReader(session, reader)
        reader.start()
        self._feed.capacity_changed()

    def _reader_ended(self, reader: Reader) -> None:
        """Called by ``reader`` as it ends: whoever awaits its stop (a stop, a restart with a
        new spec) finds the session gone from the readers."""
        sid = reader.session.sid
        running = self._readers.get(sid)
        if running is not None and running.reader is reader:
            del self._readers[sid]
            self._feed.capacity_changed()

    def _holds(self, session: HeldSession) -> bool:
        """Whether ``session`` (this lease of it, not merely its id) has a running reader."""
        running = self._readers.get(session.sid)
        return running is not None and running.session is session

    async def stop_reader(self, sid: str, reason: StopReason) -> None:
        """Stop the reader of ``sid`` (its socket is closed before this returns), then release
        or hand over its lease as ``reason`` demands. Unknown sessions are ignored."""
        running = self._readers.get(sid)
        if running is None:
            return
        await running.reader.stop()
        s = running.session
        if reason is StopReason.CANCELLED:
            await self._release(s.keys, s.lease_value, "stopped", "cancelled")
        elif reason is StopReason.LOST:
            # Usually a no-op (the lease is someone else's); when a newer epoch fenced us
            # while the lease value is still ours, this lets the new owner in at once.
            await self._release(s.keys, s.lease_value, "handoff", "fenced by a newer epoch")
        elif reason is StopReason.RECONNECT:
            await self._restart_with_new_spec(s)
        log.info(
            "session %s: reader stopped (%s)",
            sid,
            reason.value,
            extra={**_where(s), "state": _STOP_STATES[reason], "reason": reason.value},
        )

    async def _restart_with_new_spec(self, s: HeldSession) -> None:
        try:
            url, headers_json, rev = await self._redis.hmget(s.keys.spec, "url", "headers", "rev")
            s.spec = UpstreamSpec.from_redis(reply_text(url), reply_text(headers_json))
            s.spec_rev = int(reply_text(rev) or 0)
        except (*REDIS_ERRORS, InvalidInput, ValueError) as exc:
            log.warning("session %s: keeping the old spec: %s", s.sid, exc, extra=_where(s))
        if self._tg is not None and s.sid not in self._readers:
            self._start_reader(s)

    async def restore(self, session: HeldSession, seen_epoch: int) -> bool:
        """Redis answered "spec gone" for ``session`` at ``seen_epoch``: re-assert it. True
        when it is held again (``session.epoch`` is the epoch to use), False when it must stop.
        Raises the Redis client's errors when Redis cannot be reached."""
        return (await self._restore_many([(session, seen_epoch)]))[0]

    async def _restore_many(self, items: list[tuple[HeldSession, int]]) -> list[bool]:
        """Re-assert sessions, coalescing concurrent requests into one pipelined round: after
        a loss every reader asks at once, and one round trip each in turn would outlast the
        lease clocks of the last ones."""
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[bool]] = []
        for session, seen in items:
            fut: asyncio.Future[bool] = loop.create_future()
            self._restore_wanted.append((session, seen, fut))
            waits.append(fut)
        async with self._restore_lock:
            batch, self._restore_wanted = self._restore_wanted, []
            if batch:
                try:
                    held = await self._reassert(batch)
                except BaseException as exc:
                    failure = redis.exceptions.ConnectionError(f"re-assertion failed: {exc!r}")
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(failure)
                            # Its reader may have been stopped meanwhile and never look.
                            fut.add_done_callback(_retrieve)
                    for fut in waits:
                        fut.exception()  # ours are answered by the raise below
                    raise
                for (_, _, fut), ok in zip(batch, held, strict=True):
                    fut.set_result(ok)
        return [await fut for fut in waits]

    async def _reassert(self, batch: list[tuple[HeldSession, int, Any]]) -> list[bool]:
        now = self._clock()
        held = [s.epoch != seen for s, seen, _ in batch]  # re-asserted meanwhile
        due = [
            i for i, (s, _, _) in enumerate(batch) if not held[i] and not s.clock.must_fence(now)
        ]
        if not due:
            return held
        sessions = [batch[i][0] for i in due]
        sent_at = self._clock()
        epochs = await reassert_all(
            self._redis,
            self._scripts,
            sessions,
            self.worker_id,
            self._ttl_ms,
            maxlen=self.settings.history_maxlen,
            history_ttl_ms=int(self.settings.history_ttl * 1000),
        )
        restored = 0
        for i, session, epoch in zip(due, sessions, epochs, strict=True):
            if epoch is None:
                continue
            if epoch != session.epoch:
                restored += 1
                log.info(
                    "session %s: re-asserted at epoch %d, seq %d", session.sid, epoch, session.seq
                )
            session.epoch = epoch
            session.clock.confirm(sent_at)
            held[i] = True
        if restored:
            log.warning("Redis lost its data: %d sessions re-asserted", restored)
        return held

    async def _release(self, k: keys.SessionKeys, lease_value: str, final: str, why: str) -> None:
        try:
            await release_many(self._redis, self._scripts, [(k, lease_value)], final, why)
        except Exception as exc:
            log.warning(
                "session %s: release failed (lease will lapse): %s",
                k.sid,
                exc,
                extra={"session": k.sid},
            )

    # -- duties ------------------------------------------------------------------------------
    async def _renew_loop(self) -> None:
        interval = self.settings.renew_interval
        async with asyncio.TaskGroup() as rounds:
            while True:
                sent_at = self._clock()
                # A reply is worth waiting for until the clocks it would confirm run out
                # anyway: cut off sooner (a loaded machine, a busy Redis), a round Redis may
                # well apply confirms nothing, and readers fence on leases that were renewed.
                this_round = rounds.create_task(
                    self._renew_round(sent_at, deadline=self.settings.fence_after)
                )
                # The next round does not wait for this one beyond the interval: on a cluster
                # one shard slow to answer (failing over, lost) can hold a round up for the
                # whole deadline, and the clocks it confirmed at its send time would run out
                # as it ends, before a next round sent only then could confirm anything. Each
                # round ends by its deadline, so at most fence_after / interval + 1 overlap.
                next_at = sent_at + interval
                await asyncio.wait([this_round], timeout=max(0.0, next_at - self._clock()))
                if not this_round.done():
                    self._hold_admission(this_round)
                # A failed round is retried soon rather than a whole interval later: after a
                # Redis restart the next round is what keeps the lease clocks (and, after a
                # data loss, the right to re-assert) from running out.
                failed = this_round.done() and not this_round.result()
                pause = interval / RENEW_RETRY_DIVISOR if failed else interval
                await asyncio.sleep(max(0.0, sent_at + pause - self._clock()))

    def _hold_admission(self, late: asyncio.Task[bool]) -> None:
        """Take no new session (from the job feed or the reconciler) until ``late``, a
        renewal round still under way after a whole interval, ends. A worker whose rounds run
        late is short of time: adopting more would slow them further until its readers' lease
        clocks ran out, and a worker that then re-adopted the sessions it fenced would never
        catch up. The jobs wait in the queue, and the sessions the reconciler re-claims go
        there, for a worker with time to spare (this one, once the round ends)."""
        if not self._late_rounds:
            self.metrics.admission_holds.inc()
            log.warning(
                "lease renewal round still under way after %.1fs (%d sessions held): taking no "
                "new sessions until it ends",
                self.settings.renew_interval,
                len(self._readers),
            )
        self._late_rounds.add(late)
        late.add_done_callback(self._late_round_ended)

    def _late_round_ended(self, late: asyncio.Task[bool]) -> None:
        self._late_rounds.discard(late)
        if not self._late_rounds:
            log.info("renewal rounds on time again: taking new sessions")
            self._feed.capacity_changed()

    async def _renew_round(self, sent_at: float, *, deadline: float) -> bool:
        """One renewal round for every reader; False when it could not complete."""
        sessions = [r.session for r in self._readers.values()]
        epochs = [s.epoch for s in sessions]
        revs = [s.spec_rev for s in sessions]

        def answered(session: HeldSession, verdict: RenewVerdict) -> None:
            # Confirmed as each reply comes in, not once the whole round is over: on a cluster
            # a shard slow to answer (failing over, restarting) would otherwise fence the
            # readers of every other shard, whose leases Redis did renew. "Spec gone" proves as
            # much as a renewal (see below).
            if verdict in (RenewVerdict.RENEWED, RenewVerdict.SPEC_CHANGED, RenewVerdict.GONE):
                session.clock.confirm(sent_at)

        try:
            async with asyncio.timeout(deadline):
                verdicts = await renew_all(
                    self._lease_redis,
                    self._scripts,
                    sessions,
                    self._ttl_ms,
                    answered,
                    send=self._lease_send,
                )
                await registry.heartbeat(
                    self._lease_redis,
                    self.worker_id,
                    capacity=self.settings.worker_capacity,
                    load=self.load,
                    ttl=self.settings.lease_ttl,
                    started=self._started,
                )
        except (*REDIS_ERRORS, TimeoutError) as exc:
            self.metrics.lease_renew_failures.inc()
            self.metrics.redis_error["renew"].inc()
            log.warning(
                "lease renewal failed for %d sessions: %s", len(sessions), repr(exc) or "timeout"
            )
            return False
        except Exception:
            # Unconfirmed leases self-fence on time; the loop itself must go on.
            self.metrics.lease_renew_failures.inc()
            log.exception("lease renewal round failed")
            return False
        # Rounds overlap when one is slow: an older one may end after a newer one.
        if self._last_heartbeat is None or sent_at > self._last_heartbeat:
            self._last_heartbeat = sent_at
        gone = [
            (s, epoch)
            for s, epoch, verdict in zip(sessions, epochs, verdicts, strict=True)
            if verdict is RenewVerdict.GONE
        ]
        # "Spec gone" proves that, when the round was sent, nobody held these leases and no
        # reconciler could claim them (nothing left to claim): the clocks run on from then,
        # so a re-assertion slower than what was left of them does not fence its readers.
        for session, _ in gone:
            session.clock.confirm(sent_at)
        refused = await self._restore_after_loss(gone) if gone else set()
        stops = []
        for session, epoch, rev, verdict in zip(sessions, epochs, revs, verdicts, strict=True):
            if verdict in (RenewVerdict.RENEWED, RenewVerdict.SPEC_CHANGED):
                session.clock.confirm(sent_at)
            if not self._holds(session):
                # Stopped since the round was sent, and maybe held again under a new lease:
                # this verdict is about the old one.
                continue
            if verdict is RenewVerdict.SPEC_CHANGED:
                # The 'reconnect' notice was lost (or is still on its way): the renewal is
                # what makes a changed spec reach the reader within an interval regardless.
                # Unless the notice (or an earlier round) restarted it with the new spec.
                if session.spec_rev == rev:
                    stops.append(self.stop_reader(session.sid, StopReason.RECONNECT))
            elif verdict is RenewVerdict.CANCELLED:
                stops.append(self.stop_reader(session.sid, StopReason.CANCELLED))
            elif verdict is RenewVerdict.GONE:
                if session.sid in refused:
                    stops.append(self.stop_reader(session.sid, StopReason.LOST))
            elif verdict is RenewVerdict.LOST and session.epoch == epoch:
                # (A different epoch: re-asserted meanwhile by its reader.)
                stops.append(self.stop_reader(session.sid, StopReason.LOST))
        if stops:
            await asyncio.gather(*stops)
        return True

    async def _restore_after_loss(self, gone: list[tuple[HeldSession, int]]) -> set[str]:
        """Re-assert the sessions Redis forgot; returns those refused (another holder, or the
        lease clock ran out). This round is not bound by the renewal deadline: with the
        history written back it can take longer than an interval, and a re-assertion sent
        while the clock was valid is sound even if the reader fences before the reply (the
        session is then in Redis again, and the reconciler moves it on once the lease lapses).
        An error leaves the sessions to their lease clocks."""
        try:
            async with asyncio.timeout(self.settings.lease_ttl):
                held = await self._restore_many(gone)
        except (*REDIS_ERRORS, TimeoutError) as exc:
            log.warning("re-assertion of %d sessions failed: %r", len(gone), exc)
            return set()
        return {s.sid for (s, _), ok in zip(gone, held, strict=True) if not ok}

    async def _fence_loop(self) -> None:
        # Deadlines only move later (renewals) and new readers start with the latest one, so
        # sleeping until the earliest deadline seen misses nothing: one scan per renewal round.
        while True:
            now = self._clock()
            earliest = now + self.settings.fence_after
            due = []
            for sid, running in list(self._readers.items()):
                clock = running.session.clock
                if clock.must_fence(now):
                    self.metrics.self_fences.inc()
                    log.warning(
                        "session %s: no lease renewal confirmed in time; self-fencing",
                        sid,
                        extra={**_where(running.session), "state": "fenced"},
                    )
                    due.append(sid)
                else:
                    earliest = min(earliest, clock.fence_deadline())
            if due:
                # All at once: stopped one after the other, the last of a worker's thousands
                # of readers would close its socket after the margin, and the lease, ran out.
                await asyncio.gather(*(self.stop_reader(sid, StopReason.FENCED) for sid in due))
            await asyncio.sleep(max(0.01, earliest - self._clock()))

    async def _control_loop(self) -> None:
        """Follow the control channel (sharded pub/sub, one connection to the node serving it;
        the subscriber moves it after failovers and slot migrations). A notice missed while
        it was interrupted is caught by the renewal backstop: a tombstone for a cancel, a
        newer spec revision for a reconnect."""

        def lost(exc: BaseException) -> None:
            self.metrics.redis_error["control"].inc()

        subscriber = ShardedSubscriber(
            self._redis, on_message=lambda _, data: self._on_control(data), on_error=lost
        )
        async with subscriber:
            await subscriber.subscribe(keys.CONTROL_CHANNEL)
            await asyncio.Event().wait()

    def _on_control(self, data: Any) -> None:
        try:
            notice = json.loads(data)
            op, sid = notice["op"], notice["sid"]
        except (TypeError, ValueError, KeyError):
            log.warning("ignoring malformed control notice %r", data)
            return
        if sid not in self._readers:
            return
        reason = {"cancel": StopReason.CANCELLED, "reconnect": StopReason.RECONNECT}.get(op)
        if reason is not None and self._tg is not None:
            # Each stop runs on its own so a burst of notices is handled in parallel, not
            # one socket close and release round trip after another.
            self._tg.create_task(self.stop_reader(sid, reason), name=f"stop:{sid}")

    async def _reconcile_loop(self) -> None:
        period = self.settings.reconcile_period
        while True:
            # Jitter keeps a fleet's reconcilers from hitting Redis in lockstep.
            delay = period * random.uniform(0.8, 1.0)
            try:
                # Wake when the next lease lapses rather than up to a period later: a dead
                # worker's sessions then move within the TTL plus a dispatch, not TTL + period.
                # Bounded like the round itself: a reply that never comes (a cluster node
                # mid-way through losing its shard) must not stop every failover this
                # worker would make.
                async with asyncio.timeout(period):
                    due_in = await next_due_in(self._redis, self._control)
            except (*REDIS_ERRORS, TimeoutError):
                due_in = None
            if due_in is not None:
                delay = min(delay, due_in + random.uniform(0.0, RECONCILE_WAKE_JITTER))
            await asyncio.sleep(max(delay, RECONCILE_MIN_SLEEP))
            try:
                async with self._reconciling, asyncio.timeout(period * 3):
                    # Sessions it re-claims, this worker adopts while it has room: no queue
                    # round trips between a lapsed lease and its new reader.
                    claimed = await reconcile_once(
                        self._redis,
                        self._control,
                        room=self._keep_room,
                        adopt=self._adopt_kept,
                    )
                self.metrics.failovers.inc(claimed)
            except (*REDIS_ERRORS, TimeoutError) as exc:
                self.metrics.redis_error["reconcile"].inc()
                log.warning("reconcile skipped: %s", exc)
            except Exception:
                # One bad entry must not end reconciliation for the whole fleet's failovers.
                log.exception("reconcile round failed")
            finally:
                if self._kept_room:
                    self._kept_room = 0
                    self._feed.capacity_changed()


# What a stopped reader's session became, as logged in the ``state`` field.
_STOP_STATES = {
    StopReason.CANCELLED: "stopped",
    StopReason.LOST: "lost",
    StopReason.FENCED: "fenced",
    StopReason.RECONNECT: "reconnecting",
}


def _where(session: HeldSession) -> dict[str, object]:
    """Log fields naming a held session (``worker`` comes from the worker's log context)."""
    return {"session": session.sid, "epoch": session.epoch}


def _retrieve(fut: asyncio.Future[bool]) -> None:
    if not fut.cancelled():
        fut.exception()
