"""The Lua ownership protocol (claim, adopt, renew, publish, report, release, cancel) on fakeredis,
driven through SessionControl and the Scripts object as the gateway and the workers drive it."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.client import Pipeline
from rq import Queue

from listenerpool import keys
from listenerpool.connections import listen_queue
from listenerpool.control import LISTEN_JOB, ClaimOutcome, ClaimResult, SessionControl
from listenerpool.envelope import Envelope, envelope_parts
from listenerpool.errors import InvalidSessionId, InvalidUpstream
from listenerpool.keys import SessionKeys
from listenerpool.lease import LeaseClock
from listenerpool.scripts import batched
from listenerpool.settings import Settings
from listenerpool.spec import UpstreamSpec
from tests.conftest import fast_settings
from workers import renewal
from workers.reconciler import reconcile_once
from workers.renewal import RenewVerdict, renew_all
from workers.session import HeldSession

SID = "s1"
URL = "http://runner:8080/events/s1"
K = SessionKeys(SID)


@pytest.fixture
def settings() -> Settings:
    return fast_settings()


@pytest.fixture
def ttl_ms(settings: Settings) -> int:
    return int(settings.lease_ttl * 1000)


# For a lease cut short and then renewed: long enough that no stall of a loaded machine between
# the calls lets it lapse first, or hides that the renewal extended it.
LONG_TTL_MS = 60_000


@pytest.fixture
def queue(fake_sync_redis: Any, settings: Settings) -> Queue:
    return listen_queue(fake_sync_redis, settings)


@pytest.fixture
def control(fake_redis: Any, queue: Queue, settings: Settings) -> SessionControl:
    return SessionControl(fake_redis, queue, settings)


@pytest.fixture
async def ctl_channel(fake_redis: Any) -> AsyncIterator[Any]:
    ps = await subscribe(fake_redis, keys.CONTROL_CHANNEL)
    yield ps
    await ps.aclose()


# -- helpers -----------------------------------------------------------------------------------
def text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def job_args(queue: Queue) -> list[list[Any]]:
    return [list(job.args) for job in queue.jobs]


async def subscribe(redis: Any, channel: str) -> Any:
    """A sharded pub/sub subscribed to ``channel``, its confirmation already read."""
    ps = redis.pubsub()
    await ps.ssubscribe(channel)
    assert (await ps.get_message(timeout=1))["type"] == "ssubscribe"
    return ps


async def received(ps: Any) -> list[str]:
    """Every message already delivered to ``ps`` (fakeredis delivers during PUBLISH)."""
    out = []
    while (msg := await ps.get_message(ignore_subscribe_messages=True, timeout=0)) is not None:
        out.append(text(msg["data"]))
    return out


async def adopt(
    control: SessionControl, sid: str, token: str, epoch: int, ttl_ms: int, worker: str = "w1"
) -> list[Any]:
    k = SessionKeys(sid)
    reply = await control.scripts.adopt(
        keys=[k.spec, k.lease, k.cancel, k.state],
        args=[token, epoch, worker, ttl_ms],
    )
    return [text(part) for part in reply]


async def start(
    control: SessionControl, queue: Queue, sid: str, ttl_ms: int, worker: str = "w1"
) -> HeldSession:
    """Claim ``sid`` and adopt its job as ``worker``, as a worker does; the job is consumed."""
    await control.claim(sid, f"http://runner/events/{sid}")
    [job] = [j for j in queue.jobs if j.args[0] == sid]
    _, token, epoch = job.args
    job.delete()
    adopted = await adopt(control, sid, token, epoch, ttl_ms, worker)
    assert adopted[0] == 1
    return HeldSession(
        keys=SessionKeys(sid),
        token=token,
        epoch=epoch,
        lease_value=f"{worker}:{token}",
        spec=UpstreamSpec(f"http://runner/events/{sid}"),
        clock=LeaseClock(confirmed_at=0.0, fence_after=1.0),
        spec_rev=int(adopted[5]),
    )


async def publish(
    control: SessionControl, s: HeldSession, events: list[tuple[str, str, str]], **over: Any
) -> int:
    """Run the publish script as Reader._publish does; ``over`` replaces lease_value/epoch and
    the expected last seq (by default the one in Redis)."""
    value, epoch = over.get("lease_value", s.lease_value), over.get("epoch", s.epoch)
    expected = over.get("expected")
    if expected is None:
        expected = int(
            await control.scripts.publish.registered_client.hget(s.keys.state, "seq") or 0
        )
    args: list[Any] = [value, epoch, 100, 60_000, events[-1][2], expected]
    for event, data, uid in events:
        head, tail = envelope_parts(epoch, event, data, uid)
        args += [event, data, uid, head, tail]
    k = s.keys
    return int(
        await control.scripts.publish(keys=[k.lease, k.spec, k.state, k.events, k.live], args=args)
    )


async def release(control: SessionControl, s: HeldSession, final: str, value: str = "") -> int:
    """Release as a worker does: the script, then the lease index entry."""
    lease = (s.keys, value or s.lease_value)
    [verdict] = await renewal.release_many(
        control.scripts.release.registered_client, control.scripts, [lease], final, f"why-{final}"
    )
    return int(verdict)


async def renew(control: SessionControl, s: HeldSession, ttl_ms: int, value: str = "") -> int:
    k = s.keys
    return int(
        await control.scripts.renew(
            keys=[k.lease, k.cancel, k.spec],
            args=[value or s.lease_value, ttl_ms, s.epoch, s.spec_rev],
        )
    )


async def state(redis: Any, sid: str = SID) -> dict[str, str]:
    return {text(a): text(b) for a, b in (await redis.hgetall(SessionKeys(sid).state)).items()}


async def now_ms(redis: Any) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


# -- claim -------------------------------------------------------------------------------------
async def test_claim_creates_the_session_and_enqueues_one_job(
    control: SessionControl, queue: Queue, fake_redis: Any
) -> None:
    result = await control.claim(SID, URL, {"Authorization": "Bearer t"})
    assert result == ClaimResult(ClaimOutcome.CREATED, 1)

    [job] = queue.jobs
    assert job.func_name == LISTEN_JOB
    sid, token, epoch = job.args
    assert (sid, epoch) == (SID, 1)
    assert await fake_redis.get(K.lease) == f"-:{token}".encode()  # unassigned until adopted
    spec = {text(a): text(b) for a, b in (await fake_redis.hgetall(K.spec)).items()}
    assert spec["url"] == URL
    assert json.loads(spec["headers"]) == {"Authorization": "Bearer t"}
    assert (spec["desired"], spec["epoch"]) == ("1", "1")
    assert await fake_redis.zscore(K.sessions_index, SID) is not None
    # Written before the claim: due when the unadopted lease lapses.
    assert await fake_redis.zscore(K.lease_index, SID) > await now_ms(fake_redis)
    assert (await state(fake_redis))["state"] == "pending"


async def test_same_spec_again_is_unchanged_and_enqueues_nothing(
    control: SessionControl, queue: Queue
) -> None:
    await control.claim(SID, URL, {"X-A": "1", "X-B": "2"})
    again = await control.claim(SID, URL, {"X-B": "2", "X-A": "1"})
    assert again == ClaimResult(ClaimOutcome.UNCHANGED, 1)
    assert queue.count == 1


@pytest.mark.parametrize(
    ("url", "headers"), [("http://runner:8080/events/other", {}), (URL, {"X-New": "1"})]
)
async def test_changed_spec_is_updated_and_tells_workers_to_reconnect(
    control: SessionControl,
    queue: Queue,
    fake_redis: Any,
    ctl_channel: Any,
    url: str,
    headers: dict[str, str],
) -> None:
    await control.claim(SID, URL)
    assert await control.claim(SID, url, headers) == ClaimResult(ClaimOutcome.UPDATED, 1)
    assert await fake_redis.hget(K.spec, "url") == url.encode()
    assert [json.loads(m) for m in await received(ctl_channel)] == [{"op": "reconnect", "sid": SID}]
    assert queue.count == 1


async def test_concurrent_claims_of_a_new_session_yield_one_job(
    control: SessionControl, queue: Queue, fake_redis: Any
) -> None:
    results = await asyncio.gather(*(control.claim(SID, URL) for _ in range(50)))
    outcomes = Counter(r.outcome for r in results)
    assert outcomes == {ClaimOutcome.CREATED: 1, ClaimOutcome.UNCHANGED: 49}
    assert {r.epoch for r in results} == {1}
    assert queue.count == 1
    assert await fake_redis.hget(K.spec, "epoch") == b"1"


async def test_invalid_input_is_refused_before_redis(
    control: SessionControl, fake_redis: Any
) -> None:
    with pytest.raises(InvalidSessionId):
        await control.claim("a:b", URL)
    with pytest.raises(InvalidUpstream, match="http or https"):
        await control.claim(SID, "ftp://x/")
    assert await fake_redis.keys("*") == []


# -- adopt -------------------------------------------------------------------------------------
async def test_adopt_succeeds_once_for_the_jobs_token(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    await control.claim(SID, URL, {"X-A": "1"})
    [[sid, token, epoch]] = job_args(queue)

    assert await adopt(control, sid, token, epoch, ttl_ms) == [1, URL, '{"X-A":"1"}', "", "0", "1"]
    assert await fake_redis.get(K.lease) == f"w1:{token}".encode()
    assert 0 < await fake_redis.pttl(K.lease) <= ttl_ms
    st = await state(fake_redis)
    assert (st["state"], st["owner"], st["epoch"]) == ("connecting", "w1", "1")

    assert await adopt(control, sid, token, epoch, ttl_ms, worker="w2") == [0, "stale"]
    assert await fake_redis.get(K.lease) == f"w1:{token}".encode()


@pytest.mark.parametrize("wrong", ["epoch", "token"])
async def test_adopt_with_a_wrong_epoch_or_token_is_stale(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int, wrong: str
) -> None:
    await control.claim(SID, URL)
    [[sid, token, epoch]] = job_args(queue)
    if wrong == "epoch":
        epoch += 1
    else:
        token = "0" * 16
    assert await adopt(control, sid, token, epoch, ttl_ms) == [0, "stale"]
    assert (await fake_redis.get(K.lease)).startswith(b"-:")


async def test_adopt_after_cancel_drops_the_job_and_the_lease(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    await control.claim(SID, URL)
    [[sid, token, epoch]] = job_args(queue)
    assert await control.cancel(SID)
    # No reader ran yet: the cancel itself removes the unadopted lease.
    assert await fake_redis.exists(K.lease) == 0
    assert await adopt(control, sid, token, epoch, ttl_ms) == [0, "stale"]


async def test_adopt_of_an_undesired_session_drops_the_lease(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    await control.claim(SID, URL)
    [[sid, token, epoch]] = job_args(queue)
    await fake_redis.hset(K.spec, "desired", "0")
    assert await adopt(control, sid, token, epoch, ttl_ms) == [0, "cancelled"]
    assert await fake_redis.exists(K.lease) == 0
    assert (await control.status(SID)).state == "stopped"  # type: ignore[union-attr]


async def test_session_cancelled_before_adoption_ends_stopped(
    control: SessionControl, queue: Queue, ttl_ms: int
) -> None:
    await control.claim(SID, URL)
    [[sid, token, epoch]] = job_args(queue)
    await control.cancel(SID)
    await adopt(control, sid, token, epoch, ttl_ms)
    status = await control.status(SID)
    assert status is not None
    assert status.state == "stopped"


# -- renew -------------------------------------------------------------------------------------
async def test_renew_extends_only_the_owners_lease(
    control: SessionControl, queue: Queue, fake_redis: Any
) -> None:
    ttl_ms = LONG_TTL_MS
    s = await start(control, queue, SID, ttl_ms)
    await fake_redis.pexpire(K.lease, ttl_ms // 2)
    before = await now_ms(fake_redis)
    assert await renew_all(fake_redis, control.scripts, [s], ttl_ms) == [RenewVerdict.RENEWED]
    assert ttl_ms // 2 < await fake_redis.pttl(K.lease) <= ttl_ms
    assert await fake_redis.zscore(K.lease_index, SID) >= before + ttl_ms

    assert await renew(control, s, ttl_ms, value=f"w2:{s.token}") == 0
    assert await fake_redis.get(K.lease) == s.lease_value.encode()


async def test_renew_reports_a_cancel_tombstone(
    control: SessionControl, queue: Queue, ttl_ms: int
) -> None:
    s = await start(control, queue, SID, ttl_ms)
    await control.cancel(SID)
    assert await renew(control, s, ttl_ms) == -1


async def test_a_changed_spec_bumps_the_revision_and_renew_reports_it_until_caught_up(
    control: SessionControl, queue: Queue, fake_redis: Any
) -> None:
    ttl_ms = LONG_TTL_MS
    s = await start(control, queue, SID, ttl_ms)
    assert s.spec_rev == 1
    # The same spec again changes nothing the reader must act on.
    assert (await control.claim(SID, s.spec.url)).outcome is ClaimOutcome.UNCHANGED
    assert await renew(control, s, ttl_ms) == RenewVerdict.RENEWED

    assert (await control.claim(SID, URL + "-new")).outcome is ClaimOutcome.UPDATED
    assert await fake_redis.hget(K.spec, "rev") == b"2"
    await fake_redis.pexpire(K.lease, ttl_ms // 2)
    # Renewed all the same (the lease is still the reader's), and told to reconnect.
    assert await renew(control, s, ttl_ms) == RenewVerdict.SPEC_CHANGED
    assert ttl_ms // 2 < await fake_redis.pttl(K.lease) <= ttl_ms
    assert await renew(control, s, ttl_ms) == RenewVerdict.SPEC_CHANGED

    s.spec_rev = 2  # the reader reconnected with the stored spec
    assert await renew(control, s, ttl_ms) == RenewVerdict.RENEWED
    # Headers count as the spec too.
    assert (await control.claim(SID, URL + "-new", {"Authorization": "x"})).outcome is (
        ClaimOutcome.UPDATED
    )
    assert await renew(control, s, ttl_ms) == RenewVerdict.SPEC_CHANGED


async def test_a_cancel_outranks_a_changed_spec(
    control: SessionControl, queue: Queue, ttl_ms: int
) -> None:
    s = await start(control, queue, SID, ttl_ms)
    await control.claim(SID, URL + "-new")
    await control.cancel(SID)
    assert await renew(control, s, ttl_ms) == RenewVerdict.CANCELLED


# -- publish -----------------------------------------------------------------------------------
async def test_publish_appends_numbered_entries_and_live_envelopes(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await start(control, queue, SID, ttl_ms)
    live = await subscribe(fake_redis, K.live)
    events = [("RUN_STARTED", "{}", "u1"), ("m", 'say "hé" 😀', ""), ("m", "a\nb", "u3")]

    assert await publish(control, s, events) == 3
    entries = await fake_redis.xrange(K.events)
    assert [entry_id for entry_id, _ in entries] == [b"1-0", b"2-0", b"3-0"]
    expected = [Envelope(i + 1, 1, e, d, u) for i, (e, d, u) in enumerate(events)]
    assert [Envelope.from_stream_entry(fields) for _, fields in entries] == expected
    assert await received(live) == [env.to_json() for env in expected]
    st = await state(fake_redis)
    assert (st["seq"], st["last_id"]) == ("3", "u3")
    assert 0 < await fake_redis.pttl(K.events) <= 60_000

    assert await publish(control, s, [("m", "next", "u4")]) == 4
    assert (await fake_redis.xrange(K.events))[-1][0] == b"4-0"
    await live.aclose()


@pytest.mark.parametrize(
    "over", [{"epoch": 2}, {"lease_value": "w2:tok"}, {"lease_value": "-:tok"}]
)
async def test_publish_by_a_non_owner_writes_nothing(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int, over: dict[str, Any]
) -> None:
    s = await start(control, queue, SID, ttl_ms)
    live = await subscribe(fake_redis, K.live)
    assert await publish(control, s, [("m", "x", "u1")], **over) == -1
    assert await fake_redis.xlen(K.events) == 0
    assert await received(live) == []
    assert "seq" not in await state(fake_redis)
    await live.aclose()


async def test_a_batch_is_not_applied_twice(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await start(control, queue, SID, ttl_ms)
    assert await publish(control, s, [("m", "a", "u1")], expected=0) == 1
    # The same call again, as a client re-sends it when the reply was lost: refused.
    assert await publish(control, s, [("m", "a", "u1")], expected=0) == -3
    assert await fake_redis.xlen(K.events) == 1
    assert (await state(fake_redis))["seq"] == "1"


async def test_fenced_reader_cannot_publish_after_failover(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    old = await start(control, queue, SID, ttl_ms, worker="w1")
    await fake_redis.delete(K.lease)  # w1's lease lapsed
    assert await control.reclaim(SID) == 2
    [[_, token, epoch]] = job_args(queue)
    assert (await adopt(control, SID, token, epoch, ttl_ms, worker="w2"))[0] == 1

    assert await publish(control, old, [("m", "late", "u1")]) == -1
    new = HeldSession(K, token, epoch, f"w2:{token}", old.spec, old.clock)
    assert await publish(control, new, [("m", "fresh", "u1")]) == 1
    [(_, fields)] = await fake_redis.xrange(K.events)
    assert Envelope.from_stream_entry(fields) == Envelope(1, 2, "m", "fresh", "u1")


# -- report ------------------------------------------------------------------------------------
async def test_report_writes_state_only_for_the_owner(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await start(control, queue, SID, ttl_ms)
    report = control.scripts.report
    assert await report(keys=[K.lease, K.state], args=[s.lease_value, "state", "listening"]) == 1
    assert await report(keys=[K.lease, K.state], args=["w2:x", "state", "hijacked"]) == 0
    assert (await state(fake_redis))["state"] == "listening"


# -- release -----------------------------------------------------------------------------------
async def test_release_only_by_the_holder_and_handoff_is_due_at_once(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await start(control, queue, SID, ttl_ms)
    assert await release(control, s, "handoff", value="w2:other") == 0
    assert await fake_redis.get(K.lease) == s.lease_value.encode()

    assert await release(control, s, "handoff") == 1
    assert await fake_redis.exists(K.lease) == 0
    assert await fake_redis.zscore(K.lease_index, SID) <= await now_ms(fake_redis)
    st = await state(fake_redis)
    assert (st["state"], st["owner"], st["last_error"]) == ("handoff", "", "why-handoff")
    assert await release(control, s, "handoff") == 0  # already gone


async def test_a_failed_session_is_not_reclaimed_and_its_entry_goes_when_due(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await start(control, queue, SID, ttl_ms)
    assert await release(control, s, "failed") == 2
    assert (await state(fake_redis))["state"] == "failed"
    await fake_redis.zadd(K.lease_index, {SID: 0})  # its deadline comes
    assert await reconcile_once(fake_redis, control) == 0
    assert await fake_redis.zscore(K.lease_index, SID) is None
    assert queue.count == 0


async def test_a_released_undesired_session_leaves_the_index_when_due(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    s = await start(control, queue, SID, ttl_ms)
    await control.cancel(SID)
    assert await release(control, s, "stopped") == 2
    assert (await state(fake_redis))["state"] == "stopped"
    assert await fake_redis.zscore(K.lease_index, SID) is not None  # stale until due
    await fake_redis.zadd(K.lease_index, {SID: 0})
    assert await reconcile_once(fake_redis, control) == 0
    assert await fake_redis.zscore(K.lease_index, SID) is None


# -- cancel ------------------------------------------------------------------------------------
async def test_cancel_of_an_unknown_session_is_false(
    control: SessionControl, fake_redis: Any, ctl_channel: Any
) -> None:
    assert await control.cancel("nobody") is False
    assert await fake_redis.keys("lp:*") == []
    assert await received(ctl_channel) == []


async def test_cancel_of_a_running_session_tombstones_and_notifies(
    control: SessionControl,
    queue: Queue,
    fake_redis: Any,
    ttl_ms: int,
    ctl_channel: Any,
    settings: Settings,
) -> None:
    await start(control, queue, SID, ttl_ms)
    assert await control.cancel(SID) is True
    assert await fake_redis.hget(K.spec, "desired") == b"0"
    assert 0 < await fake_redis.pttl(K.cancel) <= (2 * settings.lease_ttl + 5) * 1000
    assert (await state(fake_redis))["state"] == "stopping"
    assert [json.loads(m) for m in await received(ctl_channel)] == [{"op": "cancel", "sid": SID}]


async def test_cancel_without_a_reader_is_stopped_at_once(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int, ctl_channel: Any
) -> None:
    await start(control, queue, SID, ttl_ms)
    await fake_redis.delete(K.lease)
    assert await control.cancel(SID) is True
    st = await state(fake_redis)
    assert (st["state"], st["owner"]) == ("stopped", "")
    assert await received(ctl_channel) == []  # no reader to tell


async def test_claim_after_cancel_while_the_old_lease_lives_is_pending(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    old = await start(control, queue, SID, ttl_ms)
    await control.cancel(SID)

    # A new epoch fences the old reader even if it missed the cancel notice.
    assert await control.claim(SID, URL) == ClaimResult(ClaimOutcome.PENDING, 2)
    assert await renew(control, old, ttl_ms) == 0
    assert await fake_redis.exists(K.cancel) == 0  # the new desire clears the tombstone
    assert await fake_redis.hget(K.spec, "desired") == b"1"
    assert queue.count == 0
    assert await control.reclaim(SID) is None  # the old reader still holds the lease

    assert await release(control, old, "stopped") == 1  # old reader obeys the cancel: due now
    assert await fake_redis.zscore(K.lease_index, SID) <= await now_ms(fake_redis)
    assert await reconcile_once(fake_redis, control) == 1
    [[sid, _, epoch]] = job_args(queue)
    assert (sid, epoch) == (SID, 3)


async def test_claim_after_cancel_without_a_lease_claims_a_new_epoch(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    await start(control, queue, SID, ttl_ms)
    await fake_redis.delete(K.lease)
    await control.cancel(SID)
    assert await control.claim(SID, URL) == ClaimResult(ClaimOutcome.CLAIMED, 2)
    assert [args[2] for args in job_args(queue)] == [2]


# -- reconcile (reclaim) -----------------------------------------------------------------------
async def test_reclaim_needs_a_desired_session_without_lease_or_tombstone(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    await start(control, queue, SID, ttl_ms)
    assert await control.reclaim(SID) is None  # lease held

    await fake_redis.delete(K.lease)
    await fake_redis.set(K.cancel, "1", px=10_000)
    assert await control.reclaim(SID) is None  # tombstone

    await fake_redis.delete(K.cancel)
    assert await control.reclaim(SID) == 2
    [[sid, token, epoch]] = job_args(queue)
    assert (sid, epoch) == (SID, 2)
    assert await fake_redis.get(K.lease) == f"-:{token}".encode()


async def test_reconcile_of_an_undesired_session_forgets_its_deadline(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    await start(control, queue, SID, ttl_ms)
    await fake_redis.hset(K.spec, "desired", "0")
    await fake_redis.delete(K.lease)
    assert await control.reclaim(SID) is None
    await fake_redis.zadd(K.lease_index, {SID: 0})
    assert await reconcile_once(fake_redis, control) == 0
    assert await fake_redis.zscore(K.lease_index, SID) is None
    assert queue.count == 0


async def test_an_entry_rewritten_after_the_reconciler_read_it_stays(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    """The reconciler finds a session undesired; before it drops the entry, a PUT makes the
    session wanted again and writes a new deadline: the entry must stay."""
    from listenerpool import index

    await start(control, queue, SID, ttl_ms)
    await control.cancel(SID)
    await fake_redis.delete(K.lease)
    await fake_redis.zadd(K.lease_index, {SID: 0})
    view = await index.due(fake_redis, control.scripts, limit=10)
    [entry] = view.entries
    await control.claim(SID, URL)  # rewrites the deadline, then takes a lease
    assert await index.untrack(fake_redis, control.scripts, [entry]) == 0
    assert await fake_redis.zscore(K.lease_index, SID) > await now_ms(fake_redis)


async def test_reconcile_once_claims_an_expired_lease_exactly_once(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int, settings: Settings
) -> None:
    await start(control, queue, SID, ttl_ms)
    assert await reconcile_once(fake_redis, control) == 0  # deadline in the future

    await fake_redis.delete(K.lease)
    await fake_redis.zadd(K.lease_index, {SID: 0})
    other = SessionControl(fake_redis, queue, settings)  # a second worker's reconciler
    claimed = await asyncio.gather(
        reconcile_once(fake_redis, control), reconcile_once(fake_redis, other)
    )
    assert sorted(claimed) == [0, 1]
    [[sid, _, epoch]] = job_args(queue)
    assert (sid, epoch) == (SID, 2)
    assert await fake_redis.zscore(K.lease_index, SID) > await now_ms(fake_redis)
    assert await reconcile_once(fake_redis, control) == 0


async def test_reconcile_once_drops_foreign_entries(
    control: SessionControl, fake_redis: Any
) -> None:
    for sid in ("not:a/sid", "no-spec"):
        await fake_redis.zadd(keys.lease_index(keys.index_bucket(sid)), {sid: 0})
    assert await reconcile_once(fake_redis, control) == 0
    for bucket in range(keys.INDEX_BUCKETS):
        assert await fake_redis.zcard(keys.lease_index(bucket)) == 0


async def test_claim_of_a_session_id_with_a_dot_enqueues_its_job(
    control: SessionControl, queue: Queue
) -> None:
    assert await control.claim("run.1", URL) == ClaimResult(ClaimOutcome.CREATED, 1)
    assert [args[0] for args in job_args(queue)] == ["run.1"]


async def test_reconcile_once_claims_lapsed_sessions_whatever_their_valid_id(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    for sid in ("run.1", "run-2"):
        k = SessionKeys(sid)
        await control.scripts.claim(
            keys=[k.spec, k.lease, k.cancel, k.state], args=["put", "tok", ttl_ms, URL, "{}"]
        )
        await fake_redis.delete(k.lease)
        await fake_redis.zadd(k.lease_index, {sid: 1})
    assert await reconcile_once(fake_redis, control) == 2
    assert sorted(args[0] for args in job_args(queue)) == ["run-2", "run.1"]


# -- status ------------------------------------------------------------------------------------
async def test_status_reports_spec_state_and_holder(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    assert await control.status(SID) is None
    s = await start(control, queue, SID, ttl_ms)
    await publish(control, s, [("m", "a", "u1"), ("m", "b", "u2")])
    await control.scripts.report(
        keys=[K.lease, K.state], args=[s.lease_value, "retries", 2, "last_error", "boom"]
    )
    status = await control.status(SID)
    assert status is not None
    fields = status.as_dict()
    assert fields.pop("since_ms") > 0
    assert fields == {
        "sid": SID,
        "url": f"http://runner/events/{SID}",
        "desired": True,
        "state": "connecting",
        "owner": "w1",
        "epoch": 1,
        "seq": 2,
        "retries": 2,
        "last_error": "boom",
        "last_id": "u2",
        "lease_holder": "w1",
    }


# -- renewal -----------------------------------------------------------------------------------
async def test_renew_all_returns_verdicts_in_order(
    control: SessionControl, queue: Queue, fake_redis: Any, ttl_ms: int
) -> None:
    owned = await start(control, queue, "owned", ttl_ms)
    lost = await start(control, queue, "lost", ttl_ms)
    gone = await start(control, queue, "gone", ttl_ms)
    cancelled = await start(control, queue, "cancelled", ttl_ms)
    await fake_redis.set(lost.keys.lease, "w9:someone-else", px=ttl_ms)
    await fake_redis.delete(gone.keys.lease)
    await control.cancel("cancelled")

    sessions = [lost, owned, cancelled, gone]
    verdicts = await renew_all(fake_redis, control.scripts, sessions, ttl_ms)
    assert verdicts == [
        RenewVerdict.LOST,
        RenewVerdict.RENEWED,
        RenewVerdict.CANCELLED,
        RenewVerdict.LOST,
    ]
    assert await fake_redis.get(lost.keys.lease) == b"w9:someone-else"
    assert await renew_all(fake_redis, control.scripts, [], ttl_ms) == []


async def test_a_renewal_round_is_flushed_fifty_scripts_at_a_time_in_one_run_each(
    control: SessionControl, queue: Queue, fake_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each flush is built and its replies parsed on the worker's loop, which its readers
    share: a round of many leases goes out in small flushes so that no event waits long, and
    on a single server each flush is one run of the batched script (one command to pack, one
    reply to parse)."""
    flushes: list[int] = []
    commands: list[str] = []
    real_call_many = renewal.call_many

    async def counted(
        redis: Any, script: Any, calls: Any, settled: Any = None, **named: Any
    ) -> list[Any]:
        if script is control.scripts.renew:
            flushes.append(len(calls))
        return await real_call_many(redis, script, calls, settled, **named)

    real_command = Pipeline.execute_command

    def recorded(self: Pipeline, *args: Any, **options: Any) -> Any:
        if args[0] == "EVALSHA":
            commands.append(args[1])
        return real_command(self, *args, **options)

    monkeypatch.setattr(renewal, "call_many", counted)
    # Long leases: setting up 250 sessions on a loaded machine can outlast the test TTL.
    sessions = [await start(control, queue, f"s{i}", LONG_TTL_MS) for i in range(250)]
    await control.scripts.preload(fake_redis)  # no NOSCRIPT and resend to count
    monkeypatch.setattr(Pipeline, "execute_command", recorded)
    verdicts = await renew_all(fake_redis, control.scripts, sessions, LONG_TTL_MS)
    assert verdicts == [RenewVerdict.RENEWED] * 250
    assert flushes == [50, 50, 50, 50, 50]
    renew_runs = [sha for sha in commands if sha == batched(control.scripts.renew.script).sha]
    assert len(renew_runs) == 5
    assert control.scripts.renew.sha not in commands


async def test_renew_all_keeps_order_across_batches(
    control: SessionControl,
    queue: Queue,
    fake_redis: Any,
    ttl_ms: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(renewal, "BATCH", 2)
    sessions = [await start(control, queue, f"s{i}", ttl_ms) for i in range(5)]
    await fake_redis.delete(sessions[3].keys.lease)
    verdicts = await renew_all(fake_redis, control.scripts, sessions, ttl_ms)
    assert verdicts == [1, 1, 1, 0, 1]
