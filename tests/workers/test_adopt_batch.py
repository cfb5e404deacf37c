"""A worker adopts the listen jobs it took together in one pipelined round trip (one per node
on a cluster), not one round trip per job: a ramp or a failover hands it hundreds at once."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript

from listenerpool.scripts import batched
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker
from workers.dispatch import TAKE_BATCH
from workers.worker import Worker

SESSIONS = 2 * TAKE_BATCH


class AdoptSends:
    """Counts the packets this process's asyncio Redis connections send that carry adopt.lua
    calls, alone or in batched runs, and the calls in them."""

    def __init__(self, adopt: AsyncScript) -> None:
        self.shas = (adopt.sha.encode(), batched(adopt.script).sha.encode())
        self.packets = 0
        self.calls = 0

    def wrap(self, send: Any) -> Any:
        async def counted(connection: Connection, command: Any, *args: Any, **kwargs: Any) -> Any:
            parts = [command] if isinstance(command, bytes | bytearray | memoryview) else command
            packet = b"".join(bytes(part) for part in parts)
            if any(sha in packet for sha in self.shas):
                self.packets += 1
                # Each adopt call names one session's cancel key (KEYS spec, lease, cancel,
                # state), whether it goes alone or in a run.
                self.calls += packet.count(b":cancel\r\n")
            return await send(connection, command, *args, **kwargs)

        return counted


class ReadSends:
    """Counts the packets this process's asyncio Redis connections send that read sessions'
    histories (XREVRANGE) or positions (HMGET of a state hash), and the reads in them, beside
    those carrying adopt.lua calls."""

    def __init__(self, adopt: AsyncScript) -> None:
        self.adopt = AdoptSends(adopt)
        self.history_packets = 0
        self.history_reads = 0
        self.position_reads = 0

    def wrap(self, send: Any) -> Any:
        counted_adopts = self.adopt.wrap(send)

        async def counted(connection: Connection, command: Any, *args: Any, **kwargs: Any) -> Any:
            parts = [command] if isinstance(command, bytes | bytearray | memoryview) else command
            packet = b"".join(bytes(part) for part in parts)
            # As commands (RESP bulk strings), not as words in a script being loaded.
            reads = packet.count(b"$9\r\nXREVRANGE\r\n")
            if reads:
                self.history_packets += 1
                self.history_reads += reads
            if b":state" in packet:
                self.position_reads += packet.count(b"$5\r\nHMGET\r\n")
            return await counted_adopts(connection, command, *args, **kwargs)

        return counted


def count_sends(monkeypatch: pytest.MonkeyPatch, counter: AdoptSends | ReadSends) -> None:
    """Have ``counter`` see every packet this process's asyncio Redis connections send."""
    monkeypatch.setattr(
        Connection, "send_packed_command", counter.wrap(Connection.send_packed_command)
    )


async def all_listening(worker: Worker, sids: list[str], message: str) -> None:
    """Wait until every session in ``sids`` has a reader of ``worker`` listening."""

    def listening() -> bool:
        readers = [worker.reader(sid) for sid in sids]
        return all(r is not None and r.connected.is_set() for r in readers)

    await eventually(listening, 30, message)


async def test_queued_jobs_are_adopted_in_a_round_trip_per_batch_taken(
    redis_server: RedisServer, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = Pool(redis_server.url)
    try:
        sids = [f"batch-{n}" for n in range(SESSIONS)]
        for sid in sids:  # queued before any worker runs: the worker finds them all waiting
            await pool.control.claim(sid, upstream.url(sid))
        sends = AdoptSends(pool.control.scripts.adopt)
        count_sends(monkeypatch, sends)
        async with running_worker(pool, "w-batch", worker_capacity=SESSIONS) as worker:
            await all_listening(worker, sids, "the sessions did not all start")
        assert sends.calls == SESSIONS, "one adopt per job"
        # TAKE_BATCH jobs per take: two takes, two round trips (NOSCRIPT adds none here: the
        # worker loads its scripts at start).
        assert sends.packets <= SESSIONS // TAKE_BATCH, (
            f"{sends.packets} packets for {SESSIONS} adopts"
        )
    finally:
        await pool.aclose()


async def test_a_take_over_reads_histories_in_batches_and_no_positions(
    redis_server: RedisServer, upstream: SSEUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker taking sessions over reads their recent histories (what a re-assertion after a
    data loss writes back) a batch per round trip, and its readers connect without reading
    their positions again: the adoption read them together with the lease."""
    pool = Pool(redis_server.url)
    try:
        sids = [f"over-{n}" for n in range(SESSIONS)]
        for sid in sids:
            await pool.control.claim(sid, upstream.url(sid))
        async with running_worker(pool, "w-first", worker_capacity=SESSIONS):

            async def all_published() -> bool:
                states = await pool.states(sids)
                return all(int(states[sid].get("seq", 0)) > 0 for sid in sids)

            await eventually(all_published, 30, "the sessions did not all publish")
        # Drained: every session handed back, due for the next worker.
        sends = ReadSends(pool.control.scripts.adopt)
        count_sends(monkeypatch, sends)
        async with running_worker(pool, "w-second", worker_capacity=SESSIONS) as worker:
            await all_listening(worker, sids, "the sessions were not all taken over")
            assert sends.adopt.calls == SESSIONS
            assert sends.history_reads == SESSIONS, "one history read per session"
            assert sends.history_packets <= sends.adopt.packets, (
                f"{sends.history_packets} packets of history reads for "
                f"{sends.adopt.packets} of adopts"
            )
            assert sends.position_reads == 0
    finally:
        await pool.aclose()
