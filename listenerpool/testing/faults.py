"""Random faults for soak runs, injected into a :class:`~listenerpool.testing.fleet.Fleet` and
an :class:`~listenerpool.testing.upstream.SSEUpstream` on two lanes:

- the fleet lane, one fault at a time (a fault on Redis and one on a worker never overlap, so
  each one's effect can be told apart): worker SIGKILL, SIGSTOP/SIGCONT (paused past its lease),
  SIGTERM, gateway SIGKILL, Redis restart (append-only file kept), Redis paused, Redis data lost
  (restarted empty), worker cut off from Redis (its proxy stalls past the lease);
- the upstream lane: a few sessions' upstream dies without a FIN (``vanish``), or answers 500.

Each lane shuffles its kinds into a bag and injects them at a fixed period, so every kind comes
up equally often. Every killed process is restarted, every paused one continued, every
partition healed, so the fleet stays at strength. Failover times are tracked per fault: from
the fault to each affected session listening again at a higher epoch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from listenerpool.testing.fleet import Fleet, WorkerSlot, tcp_peers
from listenerpool.testing.history import PausedWindow
from listenerpool.testing.upstream import SSEUpstream

__all__ = ["FLEET_KINDS", "KINDS", "UPSTREAM_KINDS", "FaultInjector"]

log = logging.getLogger(__name__)

FLEET_KINDS = (
    "worker_kill",
    "worker_stop",
    "worker_term",
    "gateway_kill",
    "redis_restart",
    "redis_pause",
    "redis_lose_data",
    "worker_partition",
)
UPSTREAM_KINDS = ("upstream_vanish", "upstream_500")
KINDS = FLEET_KINDS + UPSTREAM_KINDS
TRACK_TIMEOUT = 60.0  # a session not listening again within this long counts as not recovered
POLL = 0.2
STEADY_TIMEOUT = 120.0  # a data loss waits this long for every session to have a reader


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class FaultInjector:
    """Injects faults until :meth:`run` returns; read the counters afterwards.

    ``redis`` is an asyncio client on the fleet's Redis (directly, not through a proxy).
    """

    def __init__(
        self,
        fleet: Fleet,
        upstream: SSEUpstream,
        redis: Any,
        sids: Sequence[str],
        *,
        lease_ttl: float,
        idle_timeout: float,
        rng: random.Random,
        kinds: Sequence[str] = KINDS,
    ) -> None:
        self.fleet = fleet
        self.upstream = upstream
        self.redis = redis
        self.sids = list(sids)
        self.ttl = lease_ttl
        self.idle_timeout = idle_timeout
        self.rng = rng
        self.kinds = [k for k in KINDS if k in kinds]
        self.injected: Counter[str] = Counter()
        self.failover: dict[str, list[float]] = defaultdict(list)
        self.not_recovered: Counter[str] = Counter()
        self.paused: list[PausedWindow] = []
        self.not_steady: int = 0  # data-loss faults injected while a session had no reader
        self.unsteady_reasons: list[str] = []  # why, at each of those
        self._trackers: set[asyncio.Task[None]] = set()
        self.timeline: list[tuple[float, float, str]] = []  # (start, end, kind), monotonic

    # -- lanes -------------------------------------------------------------------------------
    async def run(self, duration: float, per_kind: int) -> None:
        """Inject for ``duration`` seconds, each lane at the period that yields ``per_kind``
        faults of each of its kinds; returns once every fault is undone and tracked."""
        deadline = time.monotonic() + duration
        lanes = [
            [k for k in self.kinds if k in FLEET_KINDS],
            [k for k in self.kinds if k in UPSTREAM_KINDS],
        ]
        try:
            async with asyncio.TaskGroup() as tg:
                for kinds in lanes:
                    if kinds:
                        period = duration / (len(kinds) * per_kind)
                        tg.create_task(self._lane(kinds, period, deadline))
        finally:
            if self._trackers:
                await asyncio.gather(*self._trackers, return_exceptions=True)

    async def _lane(self, kinds: list[str], period: float, deadline: float) -> None:
        start = time.monotonic()
        bag: list[str] = []
        n = 0
        while True:
            due = start + n * period
            if due >= deadline:
                return
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not bag:
                bag = list(kinds)
                self.rng.shuffle(bag)
            kind = bag.pop()
            log.info("fault %s", kind)
            began = time.monotonic()
            await self._inject(kind)
            self.timeline.append((began, time.monotonic(), kind))
            self.injected[kind] += 1
            n += 1

    async def _inject(self, kind: str) -> None:
        faults: dict[str, Callable[[], Awaitable[None]]] = {
            "worker_kill": self.worker_kill,
            "worker_stop": self.worker_stop,
            "worker_term": self.worker_term,
            "gateway_kill": self.gateway_kill,
            "redis_restart": self.redis_restart,
            "redis_pause": self.redis_pause,
            "redis_lose_data": self.redis_lose_data,
            "worker_partition": self.worker_partition,
            "upstream_vanish": self.upstream_vanish,
            "upstream_500": self.upstream_500,
        }
        await faults[kind]()

    def around(self, moment: float, before: float = 6.0) -> str:
        """The faults active in the ``before`` seconds up to ``moment``, for diagnostics."""
        kinds = [
            f"{kind}@{began - moment:+.1f}s"
            for began, ended, kind in self.timeline
            if began <= moment and ended >= moment - before
        ]
        return ", ".join(kinds) or "no fault"

    # -- fleet faults ------------------------------------------------------------------------
    async def _busiest_worker(self) -> tuple[WorkerSlot, dict[str, int]]:
        """The live worker running the most sessions (a random one among equals), and the
        epochs of its sessions: the victim that shows the most about a failover."""
        live = [s for s in self.fleet.workers if s.proc is not None and s.proc.poll() is None]
        self.rng.shuffle(live)
        best: WorkerSlot = (live or self.fleet.workers)[0]
        best_epochs: dict[str, int] = {}
        for slot in live:
            epochs = await self._epochs(owner=slot.worker_id)
            if len(epochs) > len(best_epochs):
                best, best_epochs = slot, epochs
        return best, best_epochs

    async def worker_kill(self) -> None:
        slot, epochs = await self._busiest_worker()
        self._track("worker_kill", epochs)
        assert slot.proc is not None
        await self.fleet.kill(slot.proc)
        self.fleet.start_worker(slot)

    async def worker_stop(self) -> None:
        slot, epochs = await self._busiest_worker()
        assert slot.proc is not None
        self._track("worker_stop", epochs)
        ports = await asyncio.to_thread(tcp_peers, slot.proc.pid, self.upstream.port)
        stopped = time.monotonic()
        self.fleet.signal(slot.proc, signal.SIGSTOP)
        await asyncio.sleep(self.ttl + 0.5)  # it wakes after its leases expired
        self.fleet.signal(slot.proc, signal.SIGCONT)
        self.paused.append(PausedWindow(stopped, time.monotonic(), frozenset(ports)))

    async def worker_term(self) -> None:
        slot, epochs = await self._busiest_worker()
        assert slot.proc is not None
        self._track("worker_term", epochs)
        self.fleet.signal(slot.proc, signal.SIGTERM)
        if await self.fleet.wait_exit(slot.proc, 20) is None:
            log.warning("worker %s did not drain within 20 s; killed", slot.worker_id)
            await self.fleet.kill(slot.proc)
        self.fleet.start_worker(slot)

    async def worker_partition(self) -> None:
        slot, epochs = await self._busiest_worker()
        self._track("worker_partition", epochs)
        await asyncio.to_thread(slot.proxy.set_mode, "stall")
        await asyncio.sleep(self.ttl + 0.5)  # past its leases: it must have fenced itself
        await asyncio.to_thread(slot.proxy.set_mode, "pass")

    async def gateway_kill(self) -> None:
        slot = self.rng.choice(self.fleet.gateways)
        if slot.proc is not None:
            await self.fleet.kill(slot.proc)
        await self.fleet.start_gateway(slot)

    async def redis_restart(self) -> None:
        await asyncio.to_thread(self.fleet.redis.restart)

    async def redis_pause(self) -> None:
        self.fleet.redis.pause()
        # Up to past the fencing point, short of the lease: both sides of that line.
        await asyncio.sleep(self.rng.uniform(0.3, self.ttl * 0.9))
        self.fleet.redis.resume()

    async def redis_lose_data(self) -> None:
        # Sessions with no running reader at the moment of the loss are lost by design; wait
        # for the fleet to have one everywhere (it recovers from the previous fault meanwhile).
        epochs = await self._steady(timeout=STEADY_TIMEOUT)
        if epochs is None:
            self.not_steady += 1
            epochs = await self._epochs()
        await asyncio.to_thread(self.fleet.redis.lose_data)
        tracker = self._track("redis_lose_data", epochs)
        # The next fleet fault waits for the re-assertion: a worker killed before it wrote its
        # sessions back takes them with it, which says nothing new.
        if tracker is not None:
            await asyncio.wait([tracker], timeout=STEADY_TIMEOUT)

    # -- upstream faults ---------------------------------------------------------------------
    def _some_sessions(self) -> list[str]:
        return self.rng.sample(self.sids, max(1, len(self.sids) // 20))

    async def upstream_vanish(self) -> None:
        """Upstreams that die without a FIN: silence on open streams, no answer to new ones."""
        chosen = self._some_sessions()
        for sid in chosen:
            self.upstream.configure(sid, mode="vanish")
        await asyncio.sleep(self.idle_timeout + 1.0)
        for sid in chosen:
            self.upstream.configure(sid, mode="normal")

    async def upstream_500(self) -> None:
        chosen = self._some_sessions()
        for sid in chosen:
            self.upstream.configure(sid, mode="status:500")
        await asyncio.sleep(2.0)
        for sid in chosen:
            self.upstream.configure(sid, mode="normal")

    # -- observation -------------------------------------------------------------------------
    async def _states(self, sids: Sequence[str]) -> list[tuple[str, str, int, str, int]]:
        """(state, owner, epoch, lease, lease pttl ms) per session; raises Redis errors."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(f"lp:{{{sid}}}:state", "state", "owner", "epoch")
                pipe.get(f"lp:{{{sid}}}:lease")
                pipe.pttl(f"lp:{{{sid}}}:lease")
            replies = await pipe.execute()
        out = []
        for i in range(0, len(replies), 3):
            state, owner, epoch = (_text(v) for v in replies[i])
            lease, pttl = _text(replies[i + 1]), int(replies[i + 2])
            out.append((state, owner, int(epoch or 0), lease, pttl))
        return out

    async def _epochs(self, owner: str | None = None) -> dict[str, int]:
        """Epoch per session (of ``owner``'s sessions only, if given), read before a fault."""
        deadline = time.monotonic() + 10
        while True:
            try:
                states = await self._states(self.sids)
            except Exception as exc:  # Redis recovering from the previous fault
                if time.monotonic() > deadline:
                    log.warning("could not read session states: %s", exc)
                    return {}
                await asyncio.sleep(POLL)
                continue
            return {
                sid: epoch
                for sid, (_, who, epoch, _, _) in zip(self.sids, states, strict=True)
                if owner is None or who == owner
            }

    async def _steady(self, timeout: float) -> dict[str, int] | None:
        """Wait until every session's lease is held by a live worker that keeps renewing it:
        two snapshots two renewal intervals apart, each with every lease owned by a live
        worker, in state listening or backoff, with more than half its ttl left, and the same
        lease values in both. (A reader that fenced itself stops renewing, so its lease fails
        the second look even when a renewal sent just before the fence landed late.) Returns
        the epochs then, or None at the timeout."""
        deadline = time.monotonic() + timeout
        first: list[tuple[str, str, int, str, int]] | None = None
        last_reasons: Counter[str] = Counter()
        while time.monotonic() < deadline:
            live = {s.worker_id for s in self.fleet.workers if s.proc and s.proc.poll() is None}
            try:
                states = await self._states(self.sids)
            except Exception:
                states = []
            unsteady = Counter(
                self._unsteady_reason(state, lease, pttl, live)
                for state, _, _, lease, pttl in states
            )
            unsteady.pop("", None)
            ok = bool(states) and not unsteady
            if ok and first is not None and [s[3] for s in first] != [s[3] for s in states]:
                unsteady["lease changed hands between the two looks"] += 1
            elif ok and first is not None:
                return {sid: st[2] for sid, st in zip(self.sids, states, strict=True)}
            last_reasons = unsteady if states else Counter({"Redis unreadable": 1})
            first = states if ok else None
            await asyncio.sleep(2 * self.ttl / 3 if ok else POLL)
        self.unsteady_reasons.append(
            ", ".join(f"{n} {why}" for why, n in last_reasons.most_common(4))
        )
        log.warning("fleet not steady after %.0fs: %s", timeout, self.unsteady_reasons[-1])
        return None

    def _unsteady_reason(self, state: str, lease: str, pttl: int, live: set[str]) -> str:
        """Why one session keeps the fleet from being steady ("" when it does not)."""
        if not lease:
            return f"no lease (state {state or 'gone'})"
        if lease.split(":", 1)[0] not in live:
            return f"lease of a dead or pending holder (state {state})"
        if state not in ("listening", "backoff"):
            return f"state {state}"
        if pttl <= self.ttl * 1000 / 2:
            return "lease renewal late"
        return ""

    def _track(self, kind: str, epochs: dict[str, int]) -> asyncio.Task[None] | None:
        if not epochs:
            return None
        task = asyncio.get_running_loop().create_task(self._follow_failover(kind, epochs))
        self._trackers.add(task)
        task.add_done_callback(self._trackers.discard)
        return task

    async def _follow_failover(self, kind: str, epochs: dict[str, int]) -> None:
        """Time from now until each session listens again at a higher epoch."""
        start = time.monotonic()
        waiting = dict(epochs)
        while waiting and time.monotonic() - start < TRACK_TIMEOUT:
            await asyncio.sleep(POLL)
            sids = list(waiting)
            try:
                states = await self._states(sids)
            except Exception:
                continue
            now = time.monotonic()
            for sid, (state, _, epoch, _, _) in zip(sids, states, strict=True):
                if state == "listening" and epoch > waiting[sid]:
                    self.failover[kind].append(now - start)
                    del waiting[sid]
        self.not_recovered[kind] += len(waiting)
