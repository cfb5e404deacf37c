"""The fan-out hub and a client's feed against a real Redis, with a simulated worker writing
history entries and live envelopes (so each can be withheld to make gaps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.feed import ClientTooSlow, EventFrame, Frame, ResetFrame, SessionFeed
from gateway.hub import FanoutHub
from gateway.wsprotocol import text_frame
from listenerpool.envelope import Envelope
from listenerpool.keys import SessionKeys
from listenerpool.metrics import GatewayMetrics
from tests.conftest import Pool, eventually

pytestmark = pytest.mark.timeout(30)


async def emit(redis: Any, sid: str, seq: int, *, publish: bool = True, store: bool = True) -> None:
    """What the publish script does for one event, with either half optional."""
    k = SessionKeys(sid)
    env = Envelope(seq=seq, epoch=1, event="message", data=f"event {seq}", id=str(seq))
    if store:
        await redis.xadd(
            k.events,
            {"seq": seq, "epoch": 1, "event": env.event, "data": env.data, "uid": env.id},
            id=f"{seq}-0",
        )
    if publish:
        await redis.spublish(k.live, env.to_json())


@pytest.fixture
async def hub(pool: Pool) -> AsyncIterator[FanoutHub]:
    h = FanoutHub(pool.redis, max_items=16, max_bytes=1 << 20, check_interval=0.2)
    await h.start()
    yield h
    await h.aclose()


async def take(frames: AsyncIterator[Frame], count: int) -> list[Frame]:
    out = []
    async with asyncio.timeout(10):
        while len(out) < count:
            out.append(await anext(frames))
    return out


def seqs(frames: list[Frame]) -> list[int]:
    return [f.seq for f in frames if isinstance(f, EventFrame)]


async def test_history_then_live_without_gap_or_duplicate(pool: Pool, hub: FanoutHub) -> None:
    for seq in range(1, 6):
        await emit(pool.redis, "j", seq)
    async with SessionFeed(hub, pool.redis, "j", after=2) as feed:
        frames = feed.frames()
        assert seqs(await take(frames, 3)) == [3, 4, 5]
        for seq in range(6, 9):
            await emit(pool.redis, "j", seq)
        got = await take(frames, 3)
        assert seqs(got) == [6, 7, 8]
        assert Envelope.from_json(got[0].raw).data == "event 6"  # type: ignore[union-attr]


async def test_a_live_gap_is_filled_from_history(pool: Pool, hub: FanoutHub) -> None:
    async with SessionFeed(hub, pool.redis, "g", after=0) as feed:
        frames = feed.frames()
        await emit(pool.redis, "g", 1)
        await emit(pool.redis, "g", 2, publish=False)  # lost on the live path
        await emit(pool.redis, "g", 3, publish=False)
        await emit(pool.redis, "g", 4)
        assert seqs(await take(frames, 4)) == [1, 2, 3, 4]


async def test_a_position_older_than_history_gets_a_reset(pool: Pool, hub: FanoutHub) -> None:
    for seq in range(10, 13):  # 1..9 were trimmed away
        await emit(pool.redis, "r", seq, publish=False)
    async with SessionFeed(hub, pool.redis, "r", after=3) as feed:
        got = await take(feed.frames(), 4)
        assert got[0] == ResetFrame(after=3, first_seq=10)
        assert seqs(got) == [10, 11, 12]


async def test_silence_after_a_lost_message_is_caught_by_the_stream_check(
    pool: Pool, hub: FanoutHub
) -> None:
    async with SessionFeed(hub, pool.redis, "quiet", after=0) as feed:
        frames = feed.frames()
        await emit(pool.redis, "quiet", 1)
        await emit(pool.redis, "quiet", 2, publish=False)  # lost, and nothing follows
        assert seqs(await take(frames, 2)) == [1, 2]


async def test_pubsub_connection_killed_then_clients_catch_up(pool: Pool, hub: FanoutHub) -> None:
    async with SessionFeed(hub, pool.redis, "k", after=0) as feed:
        frames = feed.frames()
        await emit(pool.redis, "k", 1)
        assert seqs(await take(frames, 1)) == [1]
        await pool.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await emit(pool.redis, "k", 2, publish=False)  # published while we were away
        await eventually(lambda: hub.resubscribes >= 1, 10, "the hub did not resubscribe")
        await emit(pool.redis, "k", 3)
        assert seqs(await take(frames, 2)) == [2, 3]


async def test_a_client_that_falls_behind_is_cut_off(pool: Pool, hub: FanoutHub) -> None:
    async with SessionFeed(hub, pool.redis, "slow", after=0) as feed:
        for seq in range(1, 40):  # queue holds 16
            await emit(pool.redis, "slow", seq)
        await eventually(feed.overflowed.is_set, 10, "no overflow")
        with pytest.raises(ClientTooSlow):
            await take(feed.frames(), 40)


async def test_one_subscription_per_session_while_it_has_clients(
    pool: Pool, hub: FanoutHub
) -> None:
    live = SessionKeys("shared").live

    async def subscribers() -> int:
        [_, count] = await pool.redis.execute_command("PUBSUB", "SHARDNUMSUB", live)
        return int(count)

    async with SessionFeed(hub, pool.redis, "shared", 0), SessionFeed(hub, pool.redis, "shared", 0):
        assert hub.channels() == 1
        assert await subscribers() == 1
    assert hub.channels() == 0

    async def none_left() -> bool:
        return await subscribers() == 0

    await eventually(none_left, 10, "still subscribed after the last client left")


class Sink:
    """A client connection's direct path: takes events while ``open``."""

    def __init__(self) -> None:
        self.open = True
        self.seqs: list[int] = []

    def __call__(self, text: bytes, frame: bytes) -> bool:
        assert frame == text_frame(text)
        if self.open:
            self.seqs.append(Envelope.from_json(text).seq)
        return self.open


async def test_live_events_in_order_go_straight_to_the_client_and_a_gap_takes_the_queue(
    pool: Pool,
) -> None:
    metrics = GatewayMetrics()
    hub = FanoutHub(pool.redis, max_items=16, check_interval=0.2, metrics=metrics)
    await hub.start()
    try:
        await follow_directly(pool, hub)
    finally:
        await hub.aclose()
    # The hub counts what it wrote (the feed yields the rest, which its route counts).
    written = metrics.registry.get_sample_value(
        "listenerpool_events_delivered_total", {"transport": "ws"}
    )
    assert written == 3


async def follow_directly(pool: Pool, hub: FanoutHub) -> None:
    for seq in (1, 2):
        await emit(pool.redis, "d", seq)
    sink = Sink()
    yielded: list[int] = []
    async with SessionFeed(hub, pool.redis, "d", after=0) as feed:
        feed.deliver_directly(sink)

        async def consume() -> None:
            async for frame in feed.frames():
                assert isinstance(frame, EventFrame)
                yielded.append(frame.seq)

        consumer = asyncio.create_task(consume())
        try:
            await eventually(lambda: yielded == [1, 2], 10, "history not yielded")
            for seq in (3, 4):
                await emit(pool.redis, "d", seq)
            await eventually(lambda: sink.seqs == [3, 4], 10, "live events not sent directly")
            await emit(pool.redis, "d", 5, publish=False)  # lost on the live path
            await emit(pool.redis, "d", 6)  # a gap: the feed reads 5 and 6 from the history
            await eventually(lambda: yielded == [1, 2, 5, 6], 10, "gap not filled")
            await emit(pool.redis, "d", 7)
            await eventually(lambda: sink.seqs == [3, 4, 7], 10, "direct path not resumed")
            sink.open = False  # the client has no room: events queue and are yielded
            await emit(pool.redis, "d", 8)
            await eventually(lambda: yielded == [1, 2, 5, 6, 8], 10, "refused event lost")
            assert feed.last == 8
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
    assert sorted(sink.seqs + yielded) == list(range(1, 9))


async def test_a_direct_path_that_fails_falls_back_to_the_queue_for_that_client_only(
    pool: Pool, hub: FanoutHub
) -> None:
    calls: list[int] = []

    def broken(text: bytes, frame: bytes) -> bool:
        calls.append(Envelope.from_json(text).seq)
        raise RuntimeError("transport gone")

    healthy = Sink()
    got: dict[str, list[int]] = {"broken": [], "healthy": []}
    await emit(pool.redis, "f", 1, publish=False)
    async with (
        SessionFeed(hub, pool.redis, "f", after=0) as first,
        SessionFeed(hub, pool.redis, "f", after=0) as second,
    ):
        first.deliver_directly(broken)
        second.deliver_directly(healthy)

        async def consume(name: str, feed: SessionFeed) -> None:
            async for frame in feed.frames():
                assert isinstance(frame, EventFrame)
                got[name].append(frame.seq)

        tasks = [
            asyncio.create_task(consume("broken", first)),
            asyncio.create_task(consume("healthy", second)),
        ]
        try:
            # Each consumer takes seq 1 from the history and waits for live events in the same
            # step, so both are waiting once both have it.
            await eventually(lambda: got == {"broken": [1], "healthy": [1]}, 10, "no history")
            for seq in (2, 3):
                await emit(pool.redis, "f", seq)
            await eventually(lambda: got["broken"] == [1, 2, 3], 10, "broken client lost events")
            await eventually(lambda: healthy.seqs == [2, 3], 10, "healthy client lost events")
            assert calls == [2]  # tried once, then that client's events take the queue
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
