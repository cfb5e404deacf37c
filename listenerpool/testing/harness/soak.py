"""A chaos soak: a fleet under random faults while clients follow sessions, then a history
check of every session (see :mod:`listenerpool.testing.harness.history`).

:func:`run_soak` sets up Redis (``redis``: one server with an append-only file, each worker
through its own TCP proxy to it; a Cluster of 3 primaries and 3 replicas; or a primary, its
replica and 3 Sentinels), ``workers`` worker processes, ``gateways`` gateway processes, an
:class:`SSEUpstream` that honours ``Last-Event-ID`` and ``sessions`` sessions on it; the first
``followed`` sessions get one client on every gateway. It injects faults for ``duration`` seconds
(:class:`~listenerpool.testing.harness.faults.FaultInjector`), lets the fleet settle, ends every
upstream stream where it is, waits for the stream and the clients to catch up, checks that
every session's open upstream connection carries its last PUT's spec, checks the histories,
then cancels every session and looks for what was left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from listenerpool.connections import listen_queue, sync_redis
from listenerpool.control import SessionControl
from listenerpool.replies import reply_text
from listenerpool.settings import load_settings
from listenerpool.testing.harness.fault_kinds import DATA_LOSS_KINDS, KINDS_FOR, refused_kinds
from listenerpool.testing.harness.faults import SPEC_HEADER, FaultInjector, stale_specs
from listenerpool.testing.harness.fleet import Fleet, tcp_peers
from listenerpool.testing.harness.followers import Follower
from listenerpool.testing.harness.history import (
    HistoryTotals,
    StoredEntry,
    check_session,
    count_overlaps,
)
from listenerpool.testing.upstream import SSEUpstream

__all__ = ["SoakConfig", "SoakResult", "run_soak"]

log = logging.getLogger(__name__)
CHUNK = 50  # sessions per pipeline or concurrent batch


@dataclass(frozen=True, slots=True)
class SoakConfig:
    duration: float = 600.0
    sessions: int = 500
    followed: int = 100
    workers: int = 3
    gateways: int = 2
    rate: float = 1.0  # events per second per session
    faults_per_kind: int = 20
    lease_ttl: float = 5.0
    idle_timeout: float = 5.0
    heartbeat: float = 1.0
    settle_timeout: float = 90.0
    kinds: tuple[str, ...] = ()  # () for every kind that applies to ``redis``
    seed: int = 1
    log_dir: Path | None = None
    redis: str = "single"  # the topology: single, cluster or sentinel
    # Behind Sentinel: a Sentinel starts no second failover of a primary within twice this.
    sentinel_failover_timeout_ms: int = 3000

    @property
    def fault_kinds(self) -> tuple[str, ...]:
        """The kinds injected: ``kinds``, or every kind that applies to the topology."""
        return self.kinds or KINDS_FOR[self.redis]

    def worker_settings(self) -> dict[str, Any]:
        return {
            "lease_ttl": self.lease_ttl,
            "idle_timeout": self.idle_timeout,
            "backoff_base": 0.05,
            "backoff_cap": 1.0,
            "connect_timeout": 2.0,
            "log_level": "INFO",
        }


@dataclass(slots=True)
class SoakResult:
    config: SoakConfig
    totals: HistoryTotals
    injected: dict[str, int]
    failover: dict[str, list[float]]
    not_recovered: dict[str, int]
    not_steady: int
    sessions_dropped: int
    not_caught_up: int
    client_failures: int
    unknown_retries: int
    upstream_open_after_cancel: int
    readers_left: int
    worker_fds_above_baseline: int
    gateway_client_sockets_left: int
    elapsed: float
    stale_spec_readers: int = 0  # sessions read on another spec than their last PUT's
    spec_changes: int = 0
    spec_notices_missed: int = 0  # spec changes whose notice no worker heard
    spec_stale_after_ttl: int = 0  # spec changes not on the upstream a lease ttl later
    notes: list[str] = field(default_factory=list)
    recovered_all: dict[str, list[float]] = field(default_factory=dict)  # per fault

    def failures(self) -> list[str]:
        """Every column that must be 0 and is not."""
        t = self.totals
        checks = {
            "lost": t.lost,
            "lost with a reset notice": t.lost_announced,
            "duplicated": t.duplicated,
            "out of order": t.out_of_order,
            "renumbered": t.renumbered,
            "stale epoch": t.stale_epoch,
            "overlapping upstream connections": t.overlaps,
            "reset notices": t.resets,
            "sessions dropped": self.sessions_dropped,
            "not recovered": sum(self.not_recovered.values()),
            "spec changes not read within a lease ttl": self.spec_stale_after_ttl,
            "readers on a stale spec": self.stale_spec_readers,
            "client failures": self.client_failures,
            "upstream connections after cancel": self.upstream_open_after_cancel,
            "readers left": self.readers_left,
            "worker fds above baseline": self.worker_fds_above_baseline,
            "gateway client sockets left": self.gateway_client_sockets_left,
        }
        return [f"{name}: {value}" for name, value in checks.items() if value]


@contextlib.contextmanager
def _log_dir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
    else:
        with tempfile.TemporaryDirectory(prefix="lp-soak-") as tmp:
            yield Path(tmp)


async def _eventually(probe: Any, timeout: float, period: float = 0.25) -> bool:
    """Poll the async ``probe`` until it returns True (errors count as False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await probe():
                return True
        await asyncio.sleep(period)
    return False


async def run_soak(config: SoakConfig) -> SoakResult:
    with _log_dir(config.log_dir) as log_dir:
        return await _Soak(config, log_dir).run()


class _Soak:
    def __init__(self, config: SoakConfig, log_dir: Path) -> None:
        refused = refused_kinds(config.redis, config.fault_kinds)
        if refused:
            raise ValueError(f"fault kinds {refused} do not apply to a {config.redis} Redis")
        self.config = config
        self.sids = [f"soak-{i}" for i in range(config.sessions)]
        self.followed = self.sids[: config.followed]
        self.fleet = Fleet(
            log_dir,
            config.worker_settings(),
            workers=config.workers,
            gateways=config.gateways,
            topology=config.redis,
            sentinel_failover_timeout_ms=config.sentinel_failover_timeout_ms,
        )
        self.upstream = SSEUpstream(rate=config.rate, heartbeat=config.heartbeat)
        self.redis: Any = None
        self.followers: list[Follower] = []
        self._baseline_kinds: dict[str, int] = {}

    async def run(self) -> SoakResult:
        started = time.monotonic()
        self.upstream.start()
        try:
            await self.fleet.start()
            self.redis = self.fleet.client()
            return await self._run(started)
        finally:
            for follower in self.followers:
                with contextlib.suppress(Exception):
                    await follower.stop()
            if self.redis is not None:
                await self.redis.aclose()
            self.fleet.stop()
            self.upstream.stop()

    async def _run(self, started: float) -> SoakResult:
        c = self.config
        settings = load_settings(redis_url=self.fleet.url, lease_ttl=c.lease_ttl)
        sync = sync_redis(settings)
        queue = listen_queue(sync, settings)
        control = SessionControl(self.redis, queue, settings)
        try:
            await self._wait_workers()
            baseline = self._worker_fds()
            first = self.fleet.workers[0].proc
            self._baseline_kinds = dict(self.fleet.fd_kinds(first.pid)) if first else {}
            for i in range(0, len(self.sids), CHUNK):
                chunk = self.sids[i : i + CHUNK]
                await asyncio.gather(*(control.claim(s, self.upstream.url(s)) for s in chunk))
            if not await _eventually(self._all_listening, c.settle_timeout):
                raise RuntimeError("the sessions did not all start listening")
            for sid in self.followed:
                for gateway in self.fleet.gateways:
                    follower = Follower(gateway.base, sid)
                    follower.start()
                    self.followers.append(follower)
            log.info("soak: %d sessions listening; faults for %gs", len(self.sids), c.duration)

            injector = FaultInjector(
                self.fleet,
                self.upstream,
                self.redis,
                self.sids,
                lease_ttl=c.lease_ttl,
                idle_timeout=c.idle_timeout,
                rng=random.Random(c.seed),
                kinds=c.fault_kinds,
                followed=self.followed,
                make_control=lambda redis: SessionControl(redis, queue, settings),
                clients=self._clients(),
            )
            await injector.run(c.duration, c.faults_per_kind)
            log.info("soak: faults over (%s); settling", dict(injector.injected))

            await _eventually(self._all_listening, c.settle_timeout)
            highest = await asyncio.to_thread(self.upstream.finish_all)
            caught_up = await _eventually(lambda: self._caught_up(highest), c.settle_timeout)
            stale = self._stale_specs(injector.spec_values)
            totals, dropped = await self._check(highest, injector, caught_up)
            not_caught_up = 0 if caught_up else await self._count_behind(highest)
            client_failures = await self._stop_followers()
            leaks = await self._leaks(control, baseline)
        finally:
            sync.close()
        return SoakResult(
            config=c,
            totals=totals,
            injected=dict(injector.injected),
            failover=dict(injector.failover),
            recovered_all=dict(injector.recovered_all),
            not_recovered=dict(injector.not_recovered),
            not_steady=injector.not_steady,
            sessions_dropped=dropped,
            not_caught_up=not_caught_up,
            client_failures=client_failures,
            unknown_retries=sum(f.refusals for f in self.followers),
            upstream_open_after_cancel=leaks[0],
            readers_left=leaks[1],
            worker_fds_above_baseline=leaks[2],
            gateway_client_sockets_left=leaks[3],
            elapsed=time.monotonic() - started,
            stale_spec_readers=len(stale),
            spec_changes=injector.spec_changes,
            spec_notices_missed=injector.notices_missed,
            spec_stale_after_ttl=injector.spec_stale_after_ttl,
            notes=[
                f"data loss injected on an unsteady fleet: {why}"
                for why in injector.unsteady_reasons
            ]
            + [f"reader on a stale spec: {why}" for why in stale[:10]],
        )

    def _clients(self) -> dict[str, list[Follower]]:
        by_sid: dict[str, list[Follower]] = {}
        for f in self.followers:
            by_sid.setdefault(f.sid, []).append(f)
        return by_sid

    # -- waiting -----------------------------------------------------------------------------
    async def _wait_workers(self) -> None:
        async def registered() -> bool:
            ids = {s.worker_id for s in self.fleet.workers}
            members = {reply_text(m) for m in await self.redis.zrange("lp:workers", 0, -1)}
            return ids <= members

        if not await _eventually(registered, 30):
            raise RuntimeError("the workers did not register")

    async def _states(self, sids: Sequence[str]) -> list[str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hget(f"lp:{{{sid}}}:state", "state")
            return [reply_text(v) for v in await pipe.execute()]

    async def _all_listening(self) -> bool:
        for i in range(0, len(self.sids), 500):
            if any(s != "listening" for s in await self._states(self.sids[i : i + 500])):
                return False
        return True

    async def _tops(self, sids: Sequence[str]) -> list[int]:
        """The upstream number of each session's last stream entry (0 when empty)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.xrevrange(f"lp:{{{sid}}}:events", count=1)
            replies = await pipe.execute()
        return [SSEUpstream.number_of(reply_text(r[0][1][b"data"])) if r else 0 for r in replies]

    async def _caught_up(self, highest: dict[str, int]) -> bool:
        for i in range(0, len(self.sids), 500):
            chunk = self.sids[i : i + 500]
            tops = await self._tops(chunk)
            if any(top != highest.get(sid, 0) for sid, top in zip(chunk, tops, strict=True)):
                return False
        return all(
            (f.received[-1].number if f.received else 0) >= highest.get(f.sid, 0)
            for f in self.followers
        )

    async def _count_behind(self, highest: dict[str, int]) -> int:
        tops = await self._tops(self.sids)
        return sum(
            1 for sid, top in zip(self.sids, tops, strict=True) if top != highest.get(sid, 0)
        )

    # -- the check ---------------------------------------------------------------------------
    def _stale_specs(self, wanted: dict[str, str]) -> list[str]:
        """Sessions with an open upstream connection opened with another spec than their last
        PUT's (``wanted``: SPEC_HEADER's value, for the sessions PUT with one)."""
        stale = []
        for sid in self.sids:
            found = stale_specs(self.upstream.stats(sid), wanted.get(sid))
            if found:
                stale.append(f"{sid}: {SPEC_HEADER} {found} open, last PUT {wanted.get(sid)!r}")
        return stale

    async def _check(
        self, highest: dict[str, int], injector: FaultInjector, caught_up: bool
    ) -> tuple[HistoryTotals, int]:
        totals = HistoryTotals()
        may_drop = any(injector.injected.get(kind, 0) for kind in DATA_LOSS_KINDS)
        by_sid = self._clients()
        end = time.monotonic()
        dropped = 0
        for i in range(0, len(self.sids), 10):
            chunk = self.sids[i : i + 10]
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in chunk:
                    pipe.xrange(f"lp:{{{sid}}}:events")
                    pipe.exists(f"lp:{{{sid}}}:spec")
                replies = await pipe.execute()
            for j, sid in enumerate(chunk):
                entries, exists = replies[2 * j], replies[2 * j + 1]
                if not exists:
                    dropped += 1
                stream = [
                    StoredEntry(
                        int(fields[b"seq"]),
                        int(fields[b"epoch"]),
                        SSEUpstream.number_of(reply_text(fields[b"data"])),
                    )
                    for _, fields in entries
                ]
                check_session(
                    totals,
                    sid,
                    highest.get(sid, 0),
                    stream,
                    [
                        (f.received, [(r.after, r.first_seq) for r in f.resets])
                        for f in by_sid.get(sid, [])
                    ],
                    history_may_be_dropped=may_drop,
                )
                count_overlaps(
                    totals,
                    sid,
                    self.upstream.stats(sid).connections,
                    injector.paused,
                    end,
                    injector.around,
                    wake_bound=self.config.lease_ttl,
                )
        return totals, dropped

    async def _stop_followers(self) -> int:
        failures = 0
        for follower in self.followers:
            try:
                await follower.stop()
            except Exception as exc:
                log.warning("client of %s on %s failed: %r", follower.sid, follower.base, exc)
                failures += 1
        return failures

    # -- leaks -------------------------------------------------------------------------------
    def _worker_fds(self) -> list[int]:
        """Per live worker: open fds other than sockets (files, pipes, event loop). Sockets
        are judged by their peer instead: those to upstreams must all be closed, while the
        number of Redis connections follows the load the connection pool has seen."""
        out = []
        for slot in self.fleet.workers:
            if slot.proc is not None and slot.proc.poll() is None:
                kinds = self.fleet.fd_kinds(slot.proc.pid)
                out.append(sum(n for kind, n in kinds.items() if kind != "socket"))
        return out

    async def _leaks(self, control: SessionControl, baseline: list[int]) -> tuple[int, ...]:
        pending = list(self.sids)
        for _ in range(10):  # the client's pooled connections may predate a Redis restart
            failed = []
            for i in range(0, len(pending), CHUNK):
                chunk = pending[i : i + CHUNK]
                outcomes = await asyncio.gather(
                    *(control.cancel(s) for s in chunk), return_exceptions=True
                )
                failed += [
                    sid
                    for sid, outcome in zip(chunk, outcomes, strict=True)
                    if isinstance(outcome, BaseException)
                ]
            if not failed:
                break
            log.info("cancel of %d sessions failed; retrying", len(failed))
            pending = failed
            await asyncio.sleep(0.5)

        async def stopped() -> bool:
            return self.upstream.total_concurrent() == 0 and await self._readers_left() == 0

        await _eventually(stopped, 30)
        upstream_open = self.upstream.total_concurrent()
        if upstream_open:
            await self._explain_open_upstreams()
        readers = await self._readers_left()
        above = max(0, max(self._worker_fds(), default=0) - max(baseline, default=0))
        if above:
            for slot in self.fleet.workers:
                if slot.proc is not None:
                    log.warning(
                        "worker %s fds: %s (at start: %s)",
                        slot.worker_id,
                        dict(self.fleet.fd_kinds(slot.proc.pid)),
                        self._baseline_kinds,
                    )
        for slot in self.fleet.workers:
            if slot.proc is not None:
                upstream_open += len(tcp_peers(slot.proc.pid, self.upstream.port))
        gateway_sockets = 0
        for gateway in self.fleet.gateways:
            if gateway.proc is not None:
                gateway_sockets += await asyncio.to_thread(_inbound, gateway.proc.pid, gateway.port)
        return upstream_open, readers, above, gateway_sockets

    async def _explain_open_upstreams(self) -> None:
        """Log what Redis says of sessions whose upstream connection outlived the cancel."""
        workers = {
            s.worker_id: (s.proc.pid, _status(s.proc.pid)) for s in self.fleet.workers if s.proc
        }
        log.warning("live workers (pid, status): %s", workers)
        for sid in self.sids:
            stats = self.upstream.stats(sid)
            if not stats.concurrent:
                continue
            open_ports = [c.peer_port for c in stats.connections if c.closed is None]
            state = await self.redis.hgetall(f"lp:{{{sid}}}:state")
            lease = await self.redis.get(f"lp:{{{sid}}}:lease")
            desired = await self.redis.hget(f"lp:{{{sid}}}:spec", "desired")
            log.warning(
                "%s: upstream connections open from ports %s; lease %r desired %r state %s",
                sid,
                open_ports,
                lease,
                desired,
                {reply_text(k): reply_text(v) for k, v in state.items()},
            )

    async def _readers_left(self) -> int:
        """Readers the live workers report in their heartbeat (``load``), once it is fresh."""
        total = 0
        for slot in self.fleet.workers:
            load = await self.redis.hget(f"lp:worker:{slot.worker_id}", "load")
            total += int(load or 0)
        return total


def _inbound(pid: int, port: int) -> int:
    """Established connections accepted by the process on ``port``."""
    import psutil

    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return 0
    return sum(1 for c in conns if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def _status(pid: int) -> str:
    import psutil

    try:
        return str(psutil.Process(pid).status())
    except psutil.Error:
        return "gone"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0
