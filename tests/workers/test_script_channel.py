"""The publisher's own Redis connection: the same runs and replies as a pipeline, each round one
write; a server that restarts, lost its scripts, wants a password, was demoted to a replica or
stopped answering without closing the connection; and no channel where the client is not a
plain TCP single server or Sentinel primary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from listenerpool.connections import async_redis
from listenerpool.keys import SessionKeys
from listenerpool.redis_process import RedisServer, free_port
from listenerpool.scripts import BATCH_CALLS, Scripts, call_many
from listenerpool.testing import TCPProxy
from tests.conftest import fast_settings
from workers.publisher import Publisher
from workers.script_channel import ScriptChannel, pack


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Any]:
    c = aioredis.Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


@pytest.fixture
async def channel(client: Any) -> AsyncIterator[ScriptChannel]:
    made = ScriptChannel.of(client)
    assert made is not None
    yield made
    made.close()


def reports(sids: list[str]) -> list[tuple[list[str], list[str]]]:
    return [([SessionKeys(s).lease, SessionKeys(s).state], ["w:1", "state", "listening"])
            for s in sids]  # fmt: skip


async def evalshas(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_commands_are_packed_as_resp_arrays_of_bulk_strings() -> None:
    assert pack(["SET", "k", "é", 12, b"\x00\r\n"]) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n$2\r\n12\r\n$3\r\n\x00\r\n\r\n"
    )
    with pytest.raises(TypeError, match="cannot send NoneType"):
        pack(["SET", "k", None])


async def test_calls_go_in_batched_runs_in_one_write_each_with_its_own_reply(
    client: Any, channel: ScriptChannel
) -> None:
    scripts = Scripts.register(client)
    await scripts.preload(client)
    count = 2 * BATCH_CALLS + 7
    sids = [f"ch-{n}" for n in range(count)]
    for sid in sids[::3]:
        await client.set(SessionKeys(sid).lease, "w:1")
    await client.config_resetstat()

    replies = await call_many(client, scripts.report, reports(sids), send=channel.send)

    assert replies == [1 if n % 3 == 0 else 0 for n in range(count)]
    assert await evalshas(client) == 3  # runs of 50, 50 and 7
    for n, sid in enumerate(sids):
        written = await client.hget(SessionKeys(sid).state, "state")
        assert written == (b"listening" if n % 3 == 0 else None), sid
    assert await call_many(client, scripts.report, reports(sids[:1]), send=channel.send) == [1]
    assert channel.connects == 1


async def test_a_failing_call_fails_alone_and_lost_scripts_are_loaded_again(
    client: Any, channel: ScriptChannel
) -> None:
    scripts = Scripts.register(client)
    sids = [f"ch-err-{n}" for n in range(5)]
    for sid in sids:
        await client.set(SessionKeys(sid).lease, "w:1")
    await client.set(SessionKeys(sids[2]).state, "not a hash")  # HSET meets WRONGTYPE
    await client.script_flush()
    settled: dict[int, Any] = {}

    def told(positions: Any, replies: Any) -> None:
        settled.update(zip(positions, replies, strict=True))

    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await call_many(client, scripts.report, reports(sids), told, send=channel.send)

    assert isinstance(settled.pop(2), redis.exceptions.ResponseError)
    assert settled == {0: 1, 1: 1, 3: 1, 4: 1}  # after NOSCRIPT, loaded and sent again


async def test_a_restarted_server_is_reconnected_to_and_a_dead_one_fails_the_round(
    redis_server: RedisServer, client: Any, channel: ScriptChannel
) -> None:
    assert await channel.send([["SET", "k", "1"]]) == [b"OK"]
    await asyncio.to_thread(redis_server.restart)

    assert await channel.send([["SET", "k", "2"], ["GET", "k"]]) == [b"OK", b"2"]
    assert channel.connects == 2

    await asyncio.to_thread(redis_server.kill)
    async with asyncio.timeout(10):
        with pytest.raises(redis.exceptions.ConnectionError):
            await channel.send([["GET", "k"]])


async def test_a_server_demoted_to_a_replica_fails_the_round_as_a_lost_connection(
    client: Any, channel: ScriptChannel
) -> None:
    """A failover leaves the old primary a replica: its READONLY means "connect to the new
    primary" (asked of the Sentinels again on connecting), not a refusal of these calls."""
    scripts = Scripts.register(client)
    await scripts.preload(client)
    sids = ["ch-ro-1", "ch-ro-2"]
    for sid in sids:
        await client.set(SessionKeys(sid).lease, "w:1")
    await client.replicaof("127.0.0.1", free_port())  # a primary that is not there
    try:
        for calls in (reports(sids[:1]), reports(sids)):  # alone, and in a batched run
            connects = channel.connects
            with pytest.raises(redis.exceptions.ConnectionError, match="read-only replica"):
                await call_many(client, scripts.report, calls, send=channel.send)
            assert channel.connects == connects + 3  # each attempt on a new connection
    finally:
        await client.replicaof("NO", "ONE")
    assert await call_many(client, scripts.report, reports(sids), send=channel.send) == [1, 1]


async def test_a_round_without_replies_in_time_fails_and_its_connection_is_dropped(
    redis_server: RedisServer,
) -> None:
    """A partition (the proxy holds every byte, closes nothing): the round waiting, and one
    queued behind it, fail with a timeout once the first has waited the reply timeout, never
    before; the next round, the partition healed, goes out on a new connection."""
    with TCPProxy(redis_server.port) as proxy:
        client = aioredis.Redis(port=proxy.port)
        channel = ScriptChannel.of(client, reply_timeout=0.5)
        assert channel is not None
        try:
            assert await channel.send([["SET", "k", "1"]]) == [b"OK"]
            await asyncio.to_thread(proxy.set_mode, "stall")
            loop = asyncio.get_running_loop()
            started = loop.time()
            waiting = [asyncio.create_task(channel.send([["GET", "k"]])) for _ in range(2)]
            async with asyncio.timeout(10):
                for task in waiting:
                    with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.5 s"):
                        await task
            assert loop.time() - started >= 0.5
            await asyncio.to_thread(proxy.set_mode, "pass")
            assert await channel.send([["GET", "k"]]) == [b"1"]
            assert channel.connects == 2
        finally:
            channel.close()
            await client.aclose()


class _PlainConnection(aioredis.Connection):
    """A connection class of the client's own: its calls go through redis-py's pipelines."""


@pytest.mark.parametrize("path", ["channel", "pipeline"])
async def test_a_publisher_round_without_replies_in_time_fails_its_calls(
    redis_server: RedisServer, path: str
) -> None:
    """On its channel or through pipelines, a publisher round that a partition holds fails
    its calls with a timeout, and the rounds after it go out once the partition heals."""
    with TCPProxy(redis_server.port) as proxy:
        if path == "channel":
            client = aioredis.Redis(port=proxy.port)
        else:
            pool = aioredis.ConnectionPool(connection_class=_PlainConnection, port=proxy.port)
            client = aioredis.Redis(connection_pool=pool)
        scripts = Scripts.register(client)
        await scripts.preload(client)
        await client.set(SessionKeys("ch-t").lease, "w:1")
        publisher = Publisher(client, scripts, script=scripts.report, reply_timeout=0.5)
        assert (publisher.channel is not None) == (path == "channel")
        running = asyncio.create_task(publisher.run())
        ((keys, args),) = reports(["ch-t"])
        try:
            assert await publisher.call(keys, args) == 1
            await asyncio.to_thread(proxy.set_mode, "stall")
            async with asyncio.timeout(10):
                with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.5 s"):
                    await publisher.call(keys, args)
            await asyncio.to_thread(proxy.set_mode, "pass")
            async with asyncio.timeout(10):
                assert await publisher.call(keys, args) == 1
        finally:
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            await client.aclose()


def test_a_reply_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="reply_timeout must be positive"):
        ScriptChannel.of(aioredis.Redis(), reply_timeout=0)


async def test_a_user_password_and_database_from_the_url_are_used(
    redis_server: RedisServer, client: Any
) -> None:
    await client.acl_setuser(
        "lp", enabled=True, passwords=["+s3cret"], keys="*", commands=["+@all"]
    )
    base = f"redis://lp:s3cret@127.0.0.1:{redis_server.port}"
    own = aioredis.Redis.from_url(f"{base}/3")
    wrong = aioredis.Redis.from_url(f"redis://lp:nope@127.0.0.1:{redis_server.port}/0")
    good, bad = ScriptChannel.of(own), ScriptChannel.of(wrong)
    assert good is not None and bad is not None
    try:
        assert await good.send([["SET", "in-db-3", "yes"]]) == [b"OK"]
        assert await own.get("in-db-3") == b"yes"
        assert await client.get("in-db-3") is None  # db 0
        with pytest.raises(redis.exceptions.AuthenticationError):
            await bad.send([["PING"]])
    finally:
        good.close()
        bad.close()
        await own.aclose()
        await wrong.aclose()


async def test_a_closed_channel_fails_what_waits_and_refuses_more(
    redis_server: RedisServer, channel: ScriptChannel
) -> None:
    assert await channel.send([["PING"]]) == [b"PONG"]
    await asyncio.to_thread(redis_server.pause)
    try:
        waiting = asyncio.create_task(channel.send([["PING"]]))
        await asyncio.sleep(0)  # let it write
        channel.close()
        async with asyncio.timeout(5):
            with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
                await waiting
        with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
            await channel.send([["PING"]])
    finally:
        await asyncio.to_thread(redis_server.resume)


async def test_only_plain_single_servers_and_sentinel_primaries_get_a_channel(
    client: Any,
) -> None:
    sentinel = async_redis(fast_settings(redis_url="redis+sentinel://127.0.0.1:26379/mymaster"))
    tls = aioredis.Redis.from_url("rediss://127.0.0.1:6390/0")
    unix = aioredis.Redis.from_url("unix:///tmp/no-such-redis.sock")
    fake = fakeredis.FakeAsyncRedis()
    try:
        assert ScriptChannel.of(client) is not None
        assert ScriptChannel.of(sentinel) is not None
        for other in (tls, unix, fake):
            assert ScriptChannel.of(other) is None, other
        assert Publisher(client, Scripts.register(client)).channel is not None
        assert Publisher(fake, Scripts.register(fake)).channel is None
    finally:
        for c in (sentinel, tls, unix, fake):
            await c.aclose()
