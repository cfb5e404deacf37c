"""The bucketed session indexes, and the rule that makes the pool run on Redis Cluster: every
script call touches keys of one hash slot only (one session, or one index bucket)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import redis.exceptions
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from rq import Queue

import workers.restore as restore_module
from listenerpool import index, keys
from listenerpool.connections import listen_queue
from listenerpool.control import SessionControl
from listenerpool.keys import SessionKeys
from listenerpool.scripts import batched
from listenerpool.settings import Settings
from tests.conftest import fast_settings
from tests.listenerpool.test_scripts import adopt, job_args, publish, start
from workers.reconciler import reconcile_once
from workers.renewal import release_all, renew_all
from workers.restore import reassert_all


@pytest.fixture
def settings() -> Settings:
    return fast_settings()


@pytest.fixture
def queue(fake_sync_redis: Any, settings: Settings) -> Queue:
    return listen_queue(fake_sync_redis, settings)


@pytest.fixture
def control(fake_redis: Any, queue: Queue, settings: Settings) -> SessionControl:
    return SessionControl(fake_redis, queue, settings)


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_buckets_are_stable_and_spread_sessions_evenly() -> None:
    assert keys.index_bucket("session-1") == keys.index_bucket("session-1")
    counts = Counter(keys.index_bucket(f"run-{i}") for i in range(16_000))
    assert set(counts) == set(range(keys.INDEX_BUCKETS))
    assert min(counts.values()) > 800 and max(counts.values()) < 1200, counts


def test_each_bucket_is_one_slot_and_the_buckets_spread_over_slots() -> None:
    for bucket in range(keys.INDEX_BUCKETS):
        assert slot(keys.lease_index(bucket)) == slot(keys.sessions_index(bucket))
        assert slot(keys.lease_index(bucket)) == slot(keys.index_intact(bucket))
    slots = {slot(keys.lease_index(b)) for b in range(keys.INDEX_BUCKETS)}
    assert len(slots) == keys.INDEX_BUCKETS
    # On a 3-primary cluster's even split, the buckets land on every primary.
    assert {s * 3 // 16384 for s in slots} == {0, 1, 2}


def test_a_sessions_keys_and_channel_share_its_slot() -> None:
    k = SessionKeys("run.7")
    assert {slot(name) for name in (k.spec, k.lease, k.cancel, k.state, k.events, k.live)} == {
        slot("{run.7}")
    }
    assert slot(keys.RQ_KEY_PREFIX + ":queue:lp-listen") == slot("{rq}")


async def test_listing_merges_every_bucket_most_recent_first(
    control: SessionControl, fake_redis: Any
) -> None:
    sids = [f"list-{i}" for i in range(40)]
    assert len({keys.index_bucket(s) for s in sids}) > 8
    for i, sid in enumerate(sids):
        await fake_redis.zadd(SessionKeys(sid).sessions_index, {sid: 1000 + i})
    page, total = await index.list_recent(fake_redis, 0, 10)
    assert (page, total) == (sids[::-1][:10], 40)
    page, _ = await index.list_recent(fake_redis, 35, 10)
    assert page == sids[::-1][35:]


async def test_due_reads_every_bucket_and_reports_more(
    control: SessionControl, fake_redis: Any
) -> None:
    sids = [f"due-{i}" for i in range(50)]
    for sid in sids:
        await fake_redis.zadd(SessionKeys(sid).lease_index, {sid: 1})
    view = await index.due(fake_redis, control.scripts, limit=2)
    assert view.more and view.next_due_in == 0.0
    everything = await index.due(fake_redis, control.scripts, limit=100)
    assert sorted(e.sid for e in everything.entries) == sorted(sids)
    assert not everything.more


async def test_every_script_call_touches_one_hash_slot(
    control: SessionControl,
    queue: Queue,
    fake_redis: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Drive every operation of the pool on fakeredis and check the KEYS of each script call."""
    calls: list[tuple[str, list[str]]] = []
    original = AsyncScript.__call__

    async def recording(self: AsyncScript, keys: Any = None, args: Any = None, client: Any = None):  # type: ignore[no-untyped-def]
        name = next(
            n for n in type(control.scripts).__slots__ if getattr(control.scripts, n) is self
        )
        calls.append((name, [k if isinstance(k, str) else k.decode() for k in keys or []]))
        return await original(self, keys=keys, args=args, client=client)

    monkeypatch.setattr(AsyncScript, "__call__", recording)
    # Pipelined calls (listenerpool.scripts.call_many) send EVALSHA themselves.
    pipelined = Pipeline.execute_command

    names = {getattr(control.scripts, n).sha: n for n in type(control.scripts).__slots__}
    # On a single server calls go in batched runs: each call's keys are told apart by the run's
    # counts (see batch.lua), and each must lie in one slot, as on a cluster it runs alone.
    batched_names = {
        batched(getattr(control.scripts, n).script).sha: n for n in type(control.scripts).__slots__
    }

    batched_runs: list[str] = []

    def recording_evalsha(self: Pipeline, *args: Any, **options: Any) -> Any:
        if args and args[0] == "EVALSHA":
            sha, numkeys = args[1], int(args[2])
            keys = [k if isinstance(k, str) else k.decode() for k in args[3 : 3 + numkeys]]
            if sha in names:
                calls.append((names[sha], keys))
            else:
                batched_runs.append(sha)
                runs, *counts = (
                    int(c) for c in args[3 + numkeys : 4 + numkeys + 2 * int(args[3 + numkeys])]
                )
                assert runs == len(counts) // 2
                for call_keys in counts[::2]:
                    calls.append((batched_names[sha], keys[:call_keys]))
                    keys = keys[call_keys:]
        return pipelined(self, *args, **options)

    monkeypatch.setattr(Pipeline, "execute_command", recording_evalsha)
    ttl_ms = int(settings.lease_ttl * 1000)
    held = [await start(control, queue, f"slot-{i}", ttl_ms) for i in range(6)]
    await publish(control, held[0], [("m", "a", "1")])
    await control.scripts.report(
        keys=[held[0].keys.lease, held[0].keys.state], args=[held[0].lease_value, "state", "x"]
    )
    await renew_all(fake_redis, control.scripts, held, ttl_ms)
    await control.claim("slot-0", "http://runner/other")  # updated: reconnect notice
    await control.cancel("slot-1")
    await release_all(fake_redis, control.scripts, held[1:3], "handoff", "test")
    for s in held[1:3]:
        await fake_redis.zadd(s.keys.lease_index, {s.sid: 0})
    await reconcile_once(fake_redis, control)
    [[sid, token, epoch]] = [a for a in job_args(queue) if a[0] == "slot-2"]
    await adopt(control, sid, token, epoch, ttl_ms)
    await fake_redis.flushall()
    await reassert_all(fake_redis, control.scripts, held[3:], "w1", ttl_ms)

    used = {name for name, _ in calls}
    assert used == set(type(control.scripts).__slots__), f"not exercised: {used}"
    assert {batched_names[sha] for sha in batched_runs} >= {"renew", "track"}
    for name, called_keys in calls:
        assert called_keys, name
        assert len({slot(k) for k in called_keys}) == 1, (name, called_keys)


async def test_a_reasserted_lease_is_never_left_without_its_index_entry(
    fake_redis: Any,
    control: SessionControl,
    queue: Queue,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a data loss the write-back creates leases again. If the connection dies right
    after (the reply lost), the index must already name them: a lease a reconciler cannot find
    would leave its session orphaned for good once its reader stops."""
    ttl_ms = int(settings.lease_ttl * 1000)
    held = [await start(control, queue, f"orphan-{i}", ttl_ms) for i in range(3)]
    await fake_redis.flushall()
    real = restore_module.call_many

    async def applied_then_cut(*args: Any, **kwargs: Any) -> Any:
        replies = await real(*args, **kwargs)
        if args[1] is control.scripts.reassert:
            raise redis.exceptions.ConnectionError("connection lost after the scripts ran")
        return replies

    monkeypatch.setattr(restore_module, "call_many", applied_then_cut)
    with pytest.raises(redis.exceptions.ConnectionError):
        await reassert_all(fake_redis, control.scripts, held, "w1", ttl_ms)
    for s in held:
        assert await fake_redis.exists(s.keys.lease), "the write-back did not run"
        assert await fake_redis.zscore(s.keys.lease_index, s.sid) is not None, s.sid


async def lose_bucket(redis: Any, bucket: int) -> None:
    """What a cluster shard brought back empty does to a bucket it held."""
    await redis.delete(
        keys.lease_index(bucket), keys.sessions_index(bucket), keys.index_intact(bucket)
    )


async def test_a_session_whose_index_bucket_was_lost_is_claimed_again(
    fake_redis: Any, control: SessionControl, queue: Queue, settings: Settings
) -> None:
    """The bucket sits on another shard than the session's keys. That shard comes back empty,
    and meanwhile the session's reader stopped (it fenced while the shard was away): the spec
    wants a reader, no lease is left, and no renewal will write the entry back."""
    ttl_ms = int(settings.lease_ttl * 1000)
    orphan = await start(control, queue, "orphan-1", ttl_ms)
    held = await start(control, queue, "held-1", ttl_ms)
    assert orphan.keys.bucket != held.keys.bucket
    assert await reconcile_once(fake_redis, control) == 0  # the markers are written now
    await lose_bucket(fake_redis, orphan.keys.bucket)
    await fake_redis.delete(orphan.keys.lease)
    await fake_redis.set("lp:{not/a session}:spec", "never written by the pool")

    assert await reconcile_once(fake_redis, control) == 1
    assert [args[:1] for args in job_args(queue)] == [["orphan-1"]]
    assert await fake_redis.zscore(orphan.keys.lease_index, "orphan-1") is not None
    assert await fake_redis.zscore(orphan.keys.sessions_index, "orphan-1") is not None
    assert await fake_redis.get(keys.index_intact(orphan.keys.bucket)) == b"intact"
    # Only the lost bucket was scanned for: the held session's entry kept its deadline.
    view = await index.due(fake_redis, control.scripts, limit=10)
    assert view.lost == [] and [e.sid for e in view.entries] == []


async def test_a_fresh_redis_marks_every_bucket_intact_and_claims_nothing(
    fake_redis: Any, control: SessionControl
) -> None:
    assert (await index.due(fake_redis, control.scripts, limit=0)).lost == list(
        range(keys.INDEX_BUCKETS)
    )
    assert await reconcile_once(fake_redis, control) == 0
    for bucket in range(keys.INDEX_BUCKETS):
        assert await fake_redis.get(keys.index_intact(bucket)) == b"intact"


async def test_a_bucket_another_reconciler_is_rebuilding_is_left_to_it(
    fake_redis: Any, control: SessionControl, queue: Queue, settings: Settings
) -> None:
    ttl_ms = int(settings.lease_ttl * 1000)
    orphan = await start(control, queue, "orphan-2", ttl_ms)
    await reconcile_once(fake_redis, control)
    await lose_bucket(fake_redis, orphan.keys.bucket)
    await fake_redis.delete(orphan.keys.lease)
    await fake_redis.set(keys.index_intact(orphan.keys.bucket), "rebuilding", px=60_000)
    assert await index.rebuild(fake_redis, control.scripts, [orphan.keys.bucket]) is None
    assert await fake_redis.zscore(orphan.keys.lease_index, "orphan-2") is None
    # Its owner died half-way: once the claim on the rebuild lapses, the next one does it.
    await fake_redis.delete(keys.index_intact(orphan.keys.bucket))
    assert await index.rebuild(fake_redis, control.scripts, [orphan.keys.bucket]) == 1
    assert await reconcile_once(fake_redis, control) == 1


async def test_a_bucket_lost_again_during_its_rebuild_stays_marked_lost(
    fake_redis: Any,
    control: SessionControl,
    queue: Queue,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ttl_ms = int(settings.lease_ttl * 1000)
    orphan = await start(control, queue, "orphan-3", ttl_ms)
    await reconcile_once(fake_redis, control)
    bucket = orphan.keys.bucket
    await lose_bucket(fake_redis, bucket)
    real_track = index.track

    async def lost_again_after(*args: Any, **kwargs: Any) -> None:
        await real_track(*args, **kwargs)
        await lose_bucket(fake_redis, bucket)

    monkeypatch.setattr(index, "track", lost_again_after)
    await index.rebuild(fake_redis, control.scripts, [bucket])
    monkeypatch.undo()
    assert (await index.due(fake_redis, control.scripts, limit=0)).lost == [bucket]
