"""The worker's publisher: the publish calls of all readers waiting at once go out in one
round, each reader gets its own call's reply, and nothing waits on it forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

from listenerpool.envelope import envelope_parts
from listenerpool.keys import SessionKeys
from listenerpool.scripts import Scripts
from listenerpool.tasks import cancel_until_done
from tests.conftest import eventually
from workers.publisher import Publisher, PublisherStopped

LEASE = "w-pub:token"
EPOCH = 1


def call(sid: str, events: int, expected_seq: int = 0) -> tuple[list[str], list[str | int]]:
    """The keys and args a reader sends for ``events`` new events of ``sid``."""
    k = SessionKeys(sid)
    args: list[str | int] = [LEASE, EPOCH, 1000, 60_000, f"{sid}-{events}", expected_seq]
    for n in range(1, events + 1):
        head, tail = envelope_parts(EPOCH, "message", f"event {n}", f"{sid}-{n}")
        args += ["message", f"event {n}", f"{sid}-{n}", head, tail]
    return [k.lease, k.spec, k.state, k.events, k.live], args


async def hold(client: Any, sid: str) -> None:
    k = SessionKeys(sid)
    await client.hset(k.spec, mapping={"url": "http://upstream/", "epoch": EPOCH})
    await client.set(k.lease, LEASE)


@pytest.fixture
async def running(fake_redis: Any) -> AsyncIterator[Publisher]:
    publisher = Publisher(fake_redis, Scripts.register(fake_redis))
    task = asyncio.create_task(publisher.run())
    try:
        yield publisher
    finally:
        await cancel_until_done(task)


async def test_the_calls_of_many_readers_go_out_in_one_round_each_with_its_own_reply(
    fake_redis: Any, running: Publisher
) -> None:
    held = [f"pub-{n}" for n in range(0, 100, 2)]  # the others have no session in Redis
    for sid in held:
        await hold(fake_redis, sid)
    sizes = {f"pub-{n}": n % 3 + 1 for n in range(100)}

    replies = await asyncio.gather(*(running.call(*call(sid, size)) for sid, size in sizes.items()))

    assert (running.rounds, running.calls) == (1, 100)
    expected = [size if sid in held else -2 for sid, size in sizes.items()]  # -2: spec gone
    assert replies == expected
    for sid in held:
        stored = await fake_redis.xrange(SessionKeys(sid).events)
        assert [f[b"data"] for _, f in stored] == [
            f"event {n}".encode() for n in range(1, sizes[sid] + 1)
        ]


async def test_one_sessions_batches_are_applied_in_order(
    fake_redis: Any, running: Publisher
) -> None:
    await hold(fake_redis, "pub-order")
    seq = 0
    for size in (2, 1, 3):
        seq = await running.call(*call("pub-order", size, expected_seq=seq))
    assert seq == 6
    # A batch sent again after its reply was lost is refused (-3), not applied twice.
    assert await running.call(*call("pub-order", 3, expected_seq=3)) == -3
    assert running.rounds == 4


async def test_a_reader_cancelled_before_the_round_is_left_out_of_it(
    fake_redis: Any, running: Publisher
) -> None:
    await hold(fake_redis, "pub-cancel")
    caller = asyncio.create_task(running.call(*call("pub-cancel", 1)))
    await asyncio.sleep(0)  # one loop step: the call is waiting, the round not yet sent
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await running.call(*call("pub-cancel", 2)) == 2
    assert running.calls == 1
    assert await fake_redis.xlen(SessionKeys("pub-cancel").events) == 2


async def test_a_call_waiting_on_a_silent_redis_fails_when_the_publisher_stops() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts the connection, reads, never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port)
    publisher = Publisher(client, Scripts.register(client))
    task = asyncio.create_task(publisher.run())
    try:
        caller = asyncio.create_task(publisher.call(*call("pub-silent", 1)))
        await eventually(lambda: publisher.rounds == 1, 5, "the round was not sent")
        assert not caller.done(), "Redis never answered, yet the call ended"
        await asyncio.wait_for(cancel_until_done(task), 5)
        with pytest.raises(PublisherStopped):
            await asyncio.wait_for(caller, 5)
        with pytest.raises(PublisherStopped):
            await publisher.call(*call("pub-silent", 1))
    finally:
        await cancel_until_done(task)
        await client.aclose(close_connection_pool=True)
        server.close()


async def test_a_round_that_fails_as_a_whole_fails_each_of_its_calls() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    publisher = Publisher(client, Scripts.register(client))
    task = asyncio.create_task(publisher.run())
    try:
        server.connected = False  # every command now fails with a connection error
        replies = await asyncio.gather(
            *(publisher.call(*call(f"pub-down-{n}", 1)) for n in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, aioredis.ConnectionError) for r in replies), replies
        server.connected = True
        await hold(client, "pub-down-0")
        assert await publisher.call(*call("pub-down-0", 1)) == 1
    finally:
        await cancel_until_done(task)
        await client.aclose()
