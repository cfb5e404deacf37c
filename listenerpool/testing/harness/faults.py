"""Random faults for soak runs, injected into a
:class:`~listenerpool.testing.harness.fleet.Fleet` and an
:class:`~listenerpool.testing.upstream.SSEUpstream` on two lanes:

- the fleet lane, one fault at a time (a fault on Redis and one on a worker never overlap, so
  each one's effect can be told apart): worker SIGKILL, SIGSTOP/SIGCONT (paused past its lease),
  SIGTERM, gateway SIGKILL, a spec change whose 'reconnect' notice is lost (the workers'
  control channel subscriptions are cut and refused while a few followed sessions are PUT with
  a new header), and the faults of the fleet's Redis topology: on one server a restart (append-
  only file kept), a pause, a data loss (restarted empty), a worker cut off from Redis (its
  proxy stalls past the lease); on a Cluster a primary SIGKILLed (its replica promoted, the node
  started again as a replica), a manual and a forced ``CLUSTER FAILOVER``, followed sessions'
  slots migrated to another primary, a shard lost whole and started again empty; behind
  Sentinel the primary SIGKILLed (the replica promoted, the old primary started again as a
  replica) and a Sentinel SIGKILLed and started again (which kinds apply where:
  :mod:`~listenerpool.testing.harness.fault_kinds`);
- the upstream lane: a few sessions' upstream dies without a FIN (``vanish``), or answers 500.

Each lane shuffles its kinds into a bag and injects them at a fixed period, so every kind comes
up equally often. Every killed process is restarted, every paused one continued, every
partition healed, so the fleet stays at strength. Recovery times are tracked per fault (what
each measures: :mod:`~listenerpool.testing.harness.fault_kinds`); for a spec change, from the
PUT to the upstream's first connection with the new header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from redis.crc import key_slot

from listenerpool import keys
from listenerpool.control import SessionControl
from listenerpool.replies import reply_text
from listenerpool.shardsub import REDIS_ERRORS
from listenerpool.testing.harness.fault_kinds import (
    FLEET_KINDS,
    KINDS,
    TRACK_TIMEOUT,
    UPSTREAM_KINDS,
)
from listenerpool.testing.harness.fleet import Fleet, WorkerSlot, tcp_peers
from listenerpool.testing.harness.followers import Follower
from listenerpool.testing.harness.history import PausedWindow
from listenerpool.testing.harness.redis_cluster import RedisClusterNodes
from listenerpool.testing.upstream import SSEUpstream, UpstreamStats

__all__ = [
    "FLEET_KINDS",
    "KINDS",
    "POOL_CHANNELS",
    "SPEC_HEADER",
    "TRACK_TIMEOUT",
    "UPSTREAM_KINDS",
    "FaultInjector",
    "stale_specs",
]

log = logging.getLogger(__name__)

POLL = 0.2
SLOW_RECOVERY = 15.0  # a recovery slower than this is logged with the faults around it
STEADY_TIMEOUT = 120.0  # a data loss waits this long for every session to have a reader
CLUSTER_HEALTHY_TIMEOUT = 60.0  # a topology fault waits this long for the previous one to heal
# A spec change keeps the session's URL, so the upstream goes on with the same numbering from
# Last-Event-ID; the request header is what tells which spec a connection was opened with.
SPEC_HEADER = "X-Soak-Spec"
SPEC_CHANGES = 5  # sessions PUT anew per spec change, at most (a third of the followed ones)
PUT_TIMEOUT = 10.0
# While the spec changes land, the pool's Redis user may use every channel but the control
# channel: Redis then drops the workers' subscriptions to it and refuses them again, while the
# gateways' live channels and a starting process's probe go on. The PUTs come from a user of
# the soak's own, whose notices are published (to no one). Killing the subscriptions alone
# (CLIENT KILL TYPE pubsub, however often) lets notices through: the Redis client subscribes
# again within a few ms. Sentinels reach the data nodes as that same default user and trade
# their hello messages on SENTINEL_HELLO: without that channel their pub/sub links are dropped
# too, each Sentinel counts the primary as down while it connects again, and two at once fail
# over a primary that is alive (both nodes then take writes, and the pool runs a second reader
# per session, until the Sentinels make the old primary a replica seconds later).
SOAK_USER = "lp-soak"
SENTINEL_HELLO = "__sentinel__:hello"
POOL_CHANNELS = ("&lp:{*", f"&{keys.PROBE_CHANNEL}", f"&{SENTINEL_HELLO}")


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
        followed: Sequence[str] = (),
        make_control: Callable[[Any], SessionControl] | None = None,
        clients: Mapping[str, Sequence[Follower]] | None = None,
    ) -> None:
        self.fleet = fleet
        self.upstream = upstream
        self.redis = redis
        self.sids = list(sids)
        self.ttl = lease_ttl
        self.idle_timeout = idle_timeout
        self.rng = rng
        self.kinds = [k for k in KINDS if k in kinds]
        self.followed = list(followed) or self.sids
        self.clients = clients or {}  # the clients following each session
        self.control: SessionControl | None = None
        # Cluster faults change the topology one at a time, each on a healthy cluster: a manual
        # failover asked of a replica still in its first sync after the previous fault is
        # dropped by Redis, and a shard lost while another fails over leaves no majority to
        # elect. Overlapping faults then test the cluster's own limits, not the pool.
        self._topology = asyncio.Lock()
        self._put_redis: Any = None
        self._notices: _NoticeLog | None = None
        if "spec_change_notice_lost" in self.kinds:
            if make_control is None:
                raise ValueError("spec changes need make_control")
            self._put_redis = fleet.client(username=SOAK_USER, password="-")
            # It records how many workers each notice reached.
            self._notices = _NoticeLog(self._put_redis)
            self.control = make_control(self._put_redis)
        self.injected: Counter[str] = Counter()
        self.failover: dict[str, list[float]] = defaultdict(list)  # per session
        # Per fault whose sessions all recovered: until the last of them did.
        self.recovered_all: dict[str, list[float]] = defaultdict(list)
        self.not_recovered: Counter[str] = Counter()
        self.paused: list[PausedWindow] = []
        self.not_steady: int = 0  # data-loss faults injected while a session had no reader
        self.unsteady_reasons: list[str] = []  # why, at each of those
        self._trackers: set[asyncio.Task[None]] = set()
        self.timeline: list[tuple[float, float, str]] = []  # (start, end, kind), monotonic
        self.spec_values: dict[str, str] = {}  # SPEC_HEADER's value in each session's last PUT
        self.spec_changes = 0  # PUTs with a new spec
        self.notices_missed = 0  # of those, sent on the control channel and heard by no worker
        self.spec_stale_after_ttl = 0  # changed sessions still read on an older spec then
        self._last_sentinel_failover = 0.0  # monotonic

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
            if self._put_redis is not None:
                await self._put_redis.aclose()

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
            "spec_change_notice_lost": self.spec_change_notice_lost,
            "primary_kill": self.primary_kill,
            "cluster_failover": lambda: self.cluster_failover(force=False),
            "cluster_failover_force": lambda: self.cluster_failover(force=True),
            "slot_migrate": self.slot_migrate,
            "shard_lost": self.shard_lost,
            "sentinel_primary_kill": self.sentinel_primary_kill,
            "sentinel_kill": self.sentinel_kill,
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
        stopped = time.monotonic()
        self.fleet.signal(slot.proc, signal.SIGSTOP)
        # Its connections are listed once it is frozen: listed before, a reconnect made between
        # the listing and the signal went unnoticed and its overlap counted as the pool's.
        ports = await asyncio.to_thread(tcp_peers, slot.proc.pid, self.upstream.port)
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
        proxy = slot.proxy
        assert proxy is not None, "only a single Redis puts a proxy before each worker"
        self._track("worker_partition", epochs)
        await asyncio.to_thread(proxy.set_mode, "stall")
        await asyncio.sleep(self.ttl + 0.5)  # past its leases: it must have fenced itself
        await asyncio.to_thread(proxy.set_mode, "pass")

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

    async def spec_change_notice_lost(self) -> None:
        """PUT a few followed sessions with a new header while the workers cannot follow the
        control channel, so only the renewal backstop can bring the new spec to the readers."""
        assert self.control is not None
        chosen = self.rng.sample(self.followed, max(1, min(SPEC_CHANGES, len(self.followed) // 3)))
        # Redis forgets its users when it restarts, and each node has its own: made again each
        # time, on every data node.
        await self._acl("SETUSER", SOAK_USER, "on", "nopass", "~*", "&*", "+@all")
        await self._acl("SETUSER", "default", "resetchannels", *POOL_CHANNELS)
        try:
            await asyncio.gather(*(self._change_spec(sid) for sid in chosen))
        finally:
            await self._acl("SETUSER", "default", "allchannels")
        # By a lease ttl after the PUT each old reader has either had a renewal, which reports
        # the new revision, or fenced itself and closed its socket. The lane waits for that (up
        # to that long), so that no other fleet fault restarts the readers meanwhile (a
        # re-adoption reads the stored spec, and would hide a backstop that does not work).
        deadline = time.monotonic() + self.ttl
        while True:
            stale = {
                sid: found
                for sid in chosen
                if (found := stale_specs(self.upstream.stats(sid), self.spec_values.get(sid)))
            }
            if not stale or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        self.spec_stale_after_ttl += len(stale)
        for sid, found in stale.items():
            log.warning(
                "%s: upstream still read with %s %s a lease ttl after the PUT of %s",
                sid,
                SPEC_HEADER,
                found,
                self.spec_values.get(sid),
            )

    async def _acl(self, *args: str) -> None:
        """An ACL command on every data node, tried again for a while: a node may be
        restarting after the previous fault."""
        deadline = time.monotonic() + PUT_TIMEOUT
        while True:
            try:
                await asyncio.to_thread(self.fleet.on_every_node, "ACL", *args)
                return
            except (*REDIS_ERRORS, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(POLL)

    async def _change_spec(self, sid: str) -> None:
        assert self.control is not None
        self.spec_changes += 1
        value = str(self.spec_changes)
        put_at = time.monotonic()
        while True:
            try:
                await self.control.claim(sid, self.upstream.url(sid), {SPEC_HEADER: value})
                break
            except REDIS_ERRORS as exc:  # pooled connections older than a Redis restart
                if time.monotonic() - put_at > PUT_TIMEOUT:
                    raise
                log.info("PUT of %s failed (%r); again", sid, exc)
                await asyncio.sleep(POLL)
        self.spec_values[sid] = value
        assert self._notices is not None
        reached = self._notices.reached.pop(sid, None)
        if reached == 0:
            self.notices_missed += 1
        log.info("%s: %s %s, notice reached %s workers", sid, SPEC_HEADER, value, reached)
        task = asyncio.get_running_loop().create_task(self._follow_spec(sid, value, put_at))
        self._trackers.add(task)
        task.add_done_callback(self._trackers.discard)

    async def _follow_spec(self, sid: str, value: str, put_at: float) -> None:
        """Time from the PUT until the upstream sees a connection with the new header."""
        while time.monotonic() - put_at < TRACK_TIMEOUT:
            if self.spec_values.get(sid) != value:
                return  # changed again meanwhile: the later change is followed instead
            stats = self.upstream.stats(sid)
            for record, headers in zip(stats.connections, stats.request_headers, strict=True):
                if record.opened >= put_at and headers.get(SPEC_HEADER.lower()) == value:
                    self.failover["spec_change_notice_lost"].append(record.opened - put_at)
                    return
            await asyncio.sleep(POLL)

    # -- Redis Cluster faults ----------------------------------------------------------------
    def _sessions_by_primary(self) -> dict[int, list[str]]:
        """The sessions on each live primary's slots (blocking: call in a thread)."""
        cluster = self.fleet.cluster
        assert cluster is not None
        primaries = [n for n in cluster.nodes() if n.role == "primary" and n.slots and not n.failed]
        out: dict[int, list[str]] = {n.port: [] for n in primaries}
        for sid in self.sids:
            slot = key_slot(keys.SessionKeys(sid).spec.encode())
            owner = next((n.port for n in primaries if n.serves(slot)), None)
            if owner is not None:
                out[owner].append(sid)
        return out

    @contextlib.asynccontextmanager
    async def _topology_change(self) -> AsyncIterator[RedisClusterNodes]:
        """The test cluster, held for one topology fault and healthy when it starts."""
        cluster = self.fleet.cluster
        assert cluster is not None
        async with self._topology:
            await asyncio.to_thread(cluster.wait_healthy, CLUSTER_HEALTHY_TIMEOUT)
            yield cluster

    async def _some_primary(self) -> tuple[int, list[str]]:
        """A random primary and the sessions on its slots."""
        by_primary = await asyncio.to_thread(self._sessions_by_primary)
        port = self.rng.choice(sorted(by_primary))
        return port, by_primary[port]

    async def primary_kill(self) -> None:
        """SIGKILL a primary: the cluster promotes its replica (writes it had not replicated are
        lost; the readers publish them again from the position Redis kept), then the killed
        node starts again, empty, and comes back as the new primary's replica."""
        async with self._topology_change() as cluster:
            port, affected = await self._some_primary()
            before = await self._tops(affected)
            started = time.monotonic()
            await asyncio.to_thread(cluster.kill, port)
            self._track_delivery("primary_kill", before, started)
            await asyncio.to_thread(cluster.restart, port)

    async def cluster_failover(self, *, force: bool) -> None:
        """``CLUSTER FAILOVER`` (the primary stops writes until its replica caught up: nothing
        lost) or ``CLUSTER FAILOVER FORCE`` (the replica takes over at once) on a random
        primary's replica."""
        async with self._topology_change() as cluster:
            port, affected = await self._some_primary()
            before = await self._tops(affected)
            started = time.monotonic()
            await asyncio.to_thread(cluster.failover, port, force=force)
            self._track_delivery("cluster_failover_force" if force else "cluster_failover", before,
                                 started)  # fmt: skip

    async def slot_migrate(self) -> None:
        """Move the slots of up to 3 followed sessions, each to another primary, while their
        streams run (MIGRATING/IMPORTING, MIGRATE of their keys, SETSLOT NODE everywhere)."""
        async with self._topology_change() as cluster:
            by_primary = await asyncio.to_thread(self._sessions_by_primary)
            owner = {sid: port for port, sids in by_primary.items() for sid in sids}
            chosen = self.rng.sample(self.followed, min(3, len(self.followed)))
            slots = {key_slot(keys.SessionKeys(sid).spec.encode()): owner[sid] for sid in chosen}
            affected = [
                sid for sid in self.sids if key_slot(keys.SessionKeys(sid).spec.encode()) in slots
            ]
            before = await self._tops(affected)
            started = time.monotonic()
            for slot, source in slots.items():
                target = self.rng.choice([p for p in by_primary if p != source])
                moved = await asyncio.to_thread(cluster.move_slot, slot, target)
                log.info("slot %d moved from %d to %d with %d keys", slot, source, target, moved)
            self._track_delivery("slot_migrate", before, started)

    async def shard_lost(self) -> None:
        """A primary and its replica SIGKILLed and started again empty: the shard's data is
        gone, as in a Redis data loss for the sessions on its slots. Like ``redis_lose_data``
        it waits for a steady fleet first and for the re-assertion after."""
        async with self._topology_change() as cluster:
            if await self._steady(timeout=STEADY_TIMEOUT) is None:
                self.not_steady += 1
            port, affected = await self._some_primary()
            before = await self._tops(affected)
            started = time.monotonic()
            await asyncio.to_thread(cluster.lose_shard, port)
            tracker = self._track_delivery("shard_lost", before, started)
        if tracker is not None:
            await asyncio.wait([tracker], timeout=STEADY_TIMEOUT)

    # -- Sentinel faults ---------------------------------------------------------------------
    async def sentinel_primary_kill(self) -> None:
        """SIGKILL the primary: the Sentinels promote the replica (writes it had not replicated
        are lost); the old primary starts again, empty, as the new primary's replica."""
        sentinels = self.fleet.sentinels
        assert sentinels is not None
        # A Sentinel starts no second failover of the same primary name within twice the
        # failover timeout of the last one: the primary would just stay dead meanwhile.
        quiet = 2 * sentinels.failover_timeout_ms / 1000 + 0.5
        await asyncio.sleep(max(0.0, self._last_sentinel_failover + quiet - time.monotonic()))
        old = await asyncio.to_thread(sentinels.primary_port)
        before = await self._tops(self.sids)
        started = time.monotonic()
        await asyncio.to_thread(sentinels.kill_primary)
        self._last_sentinel_failover = time.monotonic()
        self._track_delivery("sentinel_primary_kill", before, started)
        await asyncio.to_thread(sentinels.restart_as_replica, old)

    async def sentinel_kill(self) -> None:
        """SIGKILL one Sentinel, started again after a second or two (two of three keep the
        quorum; a client that asks the dead one asks the next)."""
        sentinels = self.fleet.sentinels
        assert sentinels is not None
        index = self.rng.randrange(len(sentinels.sentinel_ports))
        before = await self._tops(self.followed)
        started = time.monotonic()
        await asyncio.to_thread(sentinels.kill_sentinel, index)
        self._track_delivery("sentinel_kill", before, started)
        await asyncio.sleep(self.rng.uniform(1.0, 2.0))
        await asyncio.to_thread(sentinels.restart_sentinel, index)

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
            state, owner, epoch = (reply_text(v) for v in replies[i])
            lease, pttl = reply_text(replies[i + 1]), int(replies[i + 2])
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
            if not waiting:
                self.recovered_all[kind].append(now - start)
        self.not_recovered[kind] += len(waiting)

    async def _tops(self, sids: Sequence[str]) -> dict[str, int]:
        """Per session, the upstream number of the last event its stream holds, read before a
        fault (tried again for a while: Redis may still recover from the previous one)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return dict(zip(sids, [t for _, t in await self._positions(sids)], strict=True))
            except Exception as exc:
                if time.monotonic() > deadline:
                    log.warning("could not read stream positions: %s", exc)
                    return dict.fromkeys(sids, 0)
                await asyncio.sleep(POLL)

    async def _positions(self, sids: Sequence[str]) -> list[tuple[str, int]]:
        """(state, upstream number of the stream's last event) per session."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hget(f"lp:{{{sid}}}:state", "state")
                pipe.xrevrange(f"lp:{{{sid}}}:events", count=1)
            replies = await pipe.execute()
        return [
            (reply_text(replies[i]), _top_number(replies[i + 1])) for i in range(0, len(replies), 2)
        ]

    def _track_delivery(
        self, kind: str, before: dict[str, int], started: float
    ) -> asyncio.Task[None] | None:
        if not before:
            return None
        task = asyncio.get_running_loop().create_task(self._follow_delivery(kind, before, started))
        self._trackers.add(task)
        task.add_done_callback(self._trackers.discard)
        return task

    async def _follow_delivery(self, kind: str, before: dict[str, int], started: float) -> None:
        """Time from ``started`` until each session is listening, its stream holds an event
        the upstream numbered above ``before[sid]``, and each of its clients received one."""
        waiting = dict(before)
        while waiting and time.monotonic() - started < TRACK_TIMEOUT:
            sids = list(waiting)
            try:
                positions = await self._positions(sids)
            except Exception:
                await asyncio.sleep(POLL)
                continue
            now = time.monotonic()
            for sid, (state, top) in zip(sids, positions, strict=True):
                if state != "listening" or top <= waiting[sid]:
                    continue
                clients = self.clients.get(sid, ())
                if all(c.received and c.received[-1].number > waiting[sid] for c in clients):
                    self.failover[kind].append(now - started)
                    if now - started > SLOW_RECOVERY:
                        log.info("%s: %s delivering again after %.1fs (%s)", kind, sid,
                                 now - started, self.around(now, now - started))  # fmt: skip
                    del waiting[sid]
            if not waiting:
                self.recovered_all[kind].append(now - started)
                break
            await asyncio.sleep(POLL)
        if waiting:
            log.warning("%s: %d sessions not delivering again within %gs: %s", kind,
                        len(waiting), TRACK_TIMEOUT, sorted(waiting)[:10])  # fmt: skip
        self.not_recovered[kind] += len(waiting)


def _top_number(entries: Any) -> int:
    """The upstream's number of an ``XREVRANGE ... COUNT 1`` reply's entry (0 for none)."""
    if not entries:
        return 0
    return SSEUpstream.number_of(reply_text(entries[0][1].get(b"data")))


def stale_specs(stats: UpstreamStats, wanted: str | None) -> list[str | None]:
    """SPEC_HEADER's values on a session's open upstream connections that were opened with
    another value than ``wanted`` (None: no such header, as in the soak's first PUT)."""
    header = SPEC_HEADER.lower()
    return [
        headers.get(header)
        for record, headers in zip(stats.connections, stats.request_headers, strict=True)
        if record.closed is None and headers.get(header) != wanted
    ]


class _NoticeLog:
    """How many subscribers each session's last control notice reached (``reached``), read
    off the SPUBLISH calls of the asyncio Redis client ``redis``. Only that method of the
    client is replaced: the client stays what it is, so code that tells a cluster client from
    a single server's (``call_many``) still can."""

    def __init__(self, redis: Any) -> None:
        self.reached: dict[str, int] = {}
        publish = redis.spublish

        async def spublish(channel: str, message: str) -> int:
            reached = int(await publish(channel, message))
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.reached[json.loads(message)["sid"]] = reached
            return reached

        redis.spublish = spublish
