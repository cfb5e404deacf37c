"""Redis data loss at the script level: renew and publish tell "spec gone" apart from "not the
owner", and reassert.lua writes a held session back at a higher epoch with seq continuing."""

from __future__ import annotations

from typing import Any

from rq import Queue

from listenerpool.control import SessionControl
from tests.listenerpool.test_scripts import (  # the fixtures and helpers of the ownership tests
    SID,
    adopt,
    control,
    job_args,
    publish,
    queue,
    renew,
    settings,
    start,
    state,
    ttl_ms,
)
from workers.renewal import RenewVerdict, renew_all
from workers.restore import reassert_all
from workers.session import HeldSession, RecentLimit

__all__ = ["control", "queue", "settings", "ttl_ms"]  # fixtures, imported for pytest


async def lose_everything(redis: Any) -> None:
    await redis.flushall()


async def held_with_events(control: SessionControl, queue: Queue, ttl_ms: int) -> HeldSession:
    s = await start(control, queue, SID, ttl_ms)
    assert await publish(control, s, [("m", "a", "1"), ("m", "b", "2")]) == 2
    s.seq, s.last_id, s.phase = 2, "2", "listening"
    s.remember(1, s.epoch, [("m", "a", "1"), ("m", "b", "2")], RecentLimit(64, 1 << 20))
    return s


async def test_renew_and_publish_report_a_lost_spec(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await held_with_events(control, queue, ttl_ms)
    await lose_everything(fake_redis)
    assert await renew(control, s, ttl_ms) == -2
    assert await renew_all(fake_redis, control.scripts, [s], ttl_ms) == [RenewVerdict.GONE]
    assert await publish(control, s, [("m", "c", "3")]) == -2
    assert await fake_redis.exists(s.keys.events) == 0


async def test_reassert_writes_the_session_back_above_the_held_epoch(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await held_with_events(control, queue, ttl_ms)
    held = s.epoch
    await lose_everything(fake_redis)

    [epoch] = await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms)
    assert epoch == held + 1
    spec = {k.decode(): v.decode() for k, v in (await fake_redis.hgetall(s.keys.spec)).items()}
    assert (spec["url"], spec["desired"], spec["epoch"]) == (s.spec.url, "1", str(held + 1))
    # The spec's revision is the reader's: its renewals do not ask it to reconnect.
    assert spec["rev"] == str(s.spec_rev) == "1"
    assert await fake_redis.get(s.keys.lease) == s.lease_value.encode()
    assert 0 < await fake_redis.pttl(s.keys.lease) <= ttl_ms
    st = await state(fake_redis)
    assert (st["seq"], st["last_id"], st["owner"], st["state"]) == ("2", "2", "w1", "listening")
    assert await fake_redis.zscore(s.keys.sessions_index, SID) is not None
    assert await fake_redis.zscore(s.keys.lease_index, SID) is not None

    # The recent events are back in the history, at their seq and epoch.
    restored = await fake_redis.xrange(s.keys.events)
    assert [entry_id for entry_id, _ in restored] == [b"1-0", b"2-0"]
    assert restored[1][1] == {b"seq": b"2", b"epoch": str(held).encode(), b"event": b"m",
                              b"data": b"b", b"uid": b"2"}  # fmt: skip
    assert 0 < await fake_redis.pttl(s.keys.events) <= 86_400_000

    # Seq continues where it was, so a client's ``after`` still means the same event.
    s.epoch = epoch
    assert await publish(control, s, [("m", "c", "3")]) == 3
    assert [e for e, _ in await fake_redis.xrange(s.keys.events)] == [b"1-0", b"2-0", b"3-0"]
    assert await renew(control, s, ttl_ms) == 1


async def test_reassert_keeps_only_the_last_events_asked_for(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await held_with_events(control, queue, ttl_ms)
    s.recent, s.recent_size = None, 0
    s.remember(1, s.epoch, [("m", "a", "1"), ("m", "b", "2")], RecentLimit(1, 1 << 20))
    await lose_everything(fake_redis)
    await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms)
    assert [e for e, _ in await fake_redis.xrange(s.keys.events)] == [b"2-0"]


async def test_reassert_is_idempotent_for_the_same_holder(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await held_with_events(control, queue, ttl_ms)
    held = s.epoch
    assert await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms) == [held]
    await lose_everything(fake_redis)
    assert await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms) == [held + 1]
    # The reader asks again with the epoch it saw: the same answer, nothing bumped.
    assert await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms) == [held + 1]


async def test_reassert_refuses_when_someone_else_holds_the_session(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await held_with_events(control, queue, ttl_ms)
    await lose_everything(fake_redis)
    # The backend created the session anew before the worker re-asserted it.
    await control.claim(SID, s.spec.url)
    assert await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms) == [None]
    [[_, token, epoch]] = job_args(queue)
    assert (await adopt(control, SID, token, epoch, ttl_ms, worker="w2"))[0] == 1
    assert await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms) == [None]


async def test_reassert_refuses_a_holder_fenced_by_a_newer_epoch(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await held_with_events(control, queue, ttl_ms)
    await fake_redis.hincrby(s.keys.spec, "epoch", 1)  # e.g. a PUT after a DELETE
    assert await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms) == [None]
    # Also after an earlier re-assertion by the same holder.
    await lose_everything(fake_redis)
    [epoch] = await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms)
    assert epoch is not None
    s.epoch = epoch
    await fake_redis.hincrby(s.keys.spec, "epoch", 1)
    assert await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms) == [None]


async def test_reassert_puts_back_a_lost_state_alone(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await held_with_events(control, queue, ttl_ms)
    await fake_redis.delete(s.keys.state)
    assert await reassert_all(fake_redis, control.scripts, [s], "w1", ttl_ms) == [s.epoch]
    st = await state(fake_redis)
    assert (st["seq"], st["last_id"], st["epoch"]) == ("2", "2", str(s.epoch))
