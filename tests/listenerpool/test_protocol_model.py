"""The lease protocol as a state machine, explored by hypothesis against the real Lua scripts on
a real redis-server.

Each rule is one step a gateway, a worker or the environment can take, done the way the code
does it (scripts and index writes in the same order as :mod:`listenerpool.control`,
:mod:`workers.renewal` and :mod:`workers.restore`): a PUT with the same or a changed spec, a
DELETE, a worker adopting a listen job, renewing, publishing (with the right or a stale
expected seq), reporting, handing a lease back, the reconciler, a lease lapsing, a control
notice delivered or lost, a fenced reader stopping, and Redis losing all its data. Time is not
simulated: a lease lapses when the ``lapse`` rule deletes it, which also expires the lease
clock of the reader that held it (a reader self-fences before its lease can lapse, so by the
time anyone else could take the lease that reader's clock has run out, even if its process
was frozen and has not noticed yet).

After every step the invariants of docs/design.md are checked against Redis and the model.
hypothesis shrinks a failing run to a minimal sequence of rules and prints it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from listenerpool.envelope import envelope_parts
from listenerpool.keys import SessionKeys
from listenerpool.scripts import NAMES, source
from listenerpool.testing.redis_server import RedisServer

# One session: the scripts touch one session's keys only, so a second session adds no
# interleaving, only dilutes the search.
SIDS = ("a",)
# Rules that end a reader or wipe the state run on one draw in RARE, so that the sequences that
# matter (a reader outliving a DELETE, a PUT or a lapse) are reached often.
RARE = 4
WORKERS = ("w1", "w2")
SPECS = (("http://up/a", "{}"), ("http://up/b", "{}"), ("http://up/a", '{"Authorization":"t"}'))
TTL_MS = 60_000  # long: leases lapse by the ``lapse`` rule, never on their own mid-run
TOMBSTONE_MS = 60_000
MAXLEN = 10_000  # never trims within a run: the history check sees every event
# The budget in every test run (at 300 examples, deliberately broken scripts were caught in
# about half the runs; at 1,000 in every run tried); the slow-marked run explores 10x as many.
CI_EXAMPLES, CI_STEPS = 1000, 50


@dataclass
class Reader:
    """A worker's reader of one session, as the worker knows it (workers.session.HeldSession)."""

    worker: str
    sid: str
    token: str
    epoch: int
    url: str
    headers: str
    rev: int
    seq: int
    clock_valid: bool = True  # False once its lease lapsed: it must not re-assert
    generation: int = 0  # how many data losses had happened when it took the session
    recent: list[tuple[int, int]] = field(default_factory=list)  # (seq, epoch) it published

    @property
    def lease_value(self) -> str:
        return f"{self.worker}:{self.token}"

    @property
    def keys(self) -> SessionKeys:
        return SessionKeys(self.sid)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


class ProtocolModel(RuleBasedStateMachine):
    client: redis.Redis
    scripts: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.r = self.client
        self.r.flushall()
        self.readers: list[Reader] = []
        self.tokens = iter(f"{n:016x}" for n in range(1, 1 << 30))
        self.last_put: dict[str, tuple[str, str]] = {}
        self.cancelled: set[str] = set()  # DELETEd and not PUT since
        self.notices: list[tuple[str, str]] = []  # (op, sid) published, not yet delivered
        self.last_seq: dict[str, int] = {}  # highest seq accepted, per session
        self.fresh_after_loss: set[str] = set()  # seq may start again at 1 (data loss)
        self.jobs: list[tuple[str, str, int]] = []  # listen jobs on the queue: (sid, token, epoch)
        self.generation = 0  # data losses so far

    # -- helpers ---------------------------------------------------------------------------
    def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self.scripts[name](keys=keys, args=args, client=self.r)

    def track(self, sid: str, due_ms: int | None, listing: str = "") -> None:
        k = SessionKeys(sid)
        due = "" if due_ms is None else due_ms
        self.call("track", [k.lease_index, k.sessions_index], [listing, sid, due])

    def spec(self, sid: str) -> dict[str, str]:
        return {text(a): text(b) for a, b in self.r.hgetall(SessionKeys(sid).spec).items()}

    def holder(self, sid: str) -> str | None:
        value = self.r.get(SessionKeys(sid).lease)
        return None if value is None else text(value)

    def live(self, sid: str | None = None) -> list[Reader]:
        return [r for r in self.readers if sid is None or r.sid == sid]

    def stop(self, reader: Reader) -> None:
        self.readers.remove(reader)

    def release(self, reader: Reader, final: str, why: str) -> None:
        """workers.renewal.release_many: the script, then the index entry due at once."""
        k = reader.keys
        verdict = int(self.call("release", [k.lease, k.spec, k.state], [reader.lease_value,
                                                                         final, why]))  # fmt: skip
        if verdict != 0:
            self.track(reader.sid, 0)
        self.stop(reader)

    def restart_with_stored_spec(self, reader: Reader) -> None:
        """workers.worker.Worker._restart_with_new_spec: read url, headers and rev at once."""
        url, headers, rev = self.r.hmget(reader.keys.spec, "url", "headers", "rev")
        if url is not None:
            reader.url, reader.headers, reader.rev = text(url), text(headers), int(text(rev or 0))

    def reassert(self, reader: Reader) -> bool:
        """workers.restore.reassert_all for one reader, then its index entries."""
        k = reader.keys
        recent: list[Any] = []
        for seq, epoch in reader.recent[-4:]:
            recent += [seq, epoch, "m", f"{reader.sid}-{seq}", ""]
        reply = self.call(
            "reassert",
            [k.spec, k.lease, k.state, k.events],
            [reader.lease_value, reader.epoch, TTL_MS, reader.url, reader.headers, reader.seq,
             "", reader.worker, "listening", MAXLEN, 86_400_000, reader.rev, *recent],
        )  # fmt: skip
        if int(reply[0]) != 1:
            return False
        reader.epoch = int(reply[1])
        reader.generation = self.generation
        self.track(reader.sid, TTL_MS, "ensure")
        # What the reader ran is what the pool wants now (docs/design.md, data loss).
        self.last_put[reader.sid] = (reader.url, reader.headers)
        return True

    # -- the gateway -----------------------------------------------------------------------
    @initialize(spec=st.sampled_from(SPECS))
    def start(self, spec: tuple[str, str]) -> None:
        self.r.flushall()
        self.put(SIDS[0], spec)  # most sequences worth exploring start from a session

    @rule(sid=st.sampled_from(SIDS), spec=st.sampled_from(SPECS))
    def put(self, sid: str, spec: tuple[str, str]) -> None:
        """listenerpool.control.SessionControl.claim."""
        k = SessionKeys(sid)
        token = next(self.tokens)
        self.track(sid, TTL_MS, "touch")  # the index entry first
        before = self.spec(sid)
        outcome, epoch, due_ms = self.call(
            "claim", [k.spec, k.lease, k.cancel, k.state], ["put", token, TTL_MS, *spec]
        )
        outcome = text(outcome)
        self.last_put[sid] = spec
        self.cancelled.discard(sid)
        changed = (before.get("url"), before.get("headers")) != spec
        if changed:
            assert int(self.spec(sid)["rev"]) == int(before.get("rev", 0)) + 1
        if outcome in ("created", "claimed"):
            self.jobs.append((sid, token, int(epoch)))
            return
        self.track(sid, int(due_ms))
        if outcome == "updated":
            assert changed
            self.notices.append(("reconnect", sid))

    @rule(sid=st.sampled_from(SIDS))
    def delete(self, sid: str) -> None:
        """listenerpool.control.SessionControl.cancel."""
        k = SessionKeys(sid)
        found = int(self.call("cancel", [k.spec, k.cancel, k.lease, k.state], [TOMBSTONE_MS]))
        if found:
            self.cancelled.add(sid)
            self.last_put.pop(sid, None)
        if found == 1:
            self.notices.append(("cancel", sid))

    # -- workers ---------------------------------------------------------------------------
    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), worker=st.sampled_from(WORKERS), redelivered=st.booleans())
    def adopt(self, data: st.DataObject, worker: str, redelivered: bool) -> None:
        """workers.worker.Worker._adopt; a job may be delivered again (a worker that took it
        died before acknowledging it, and rq hands it to another)."""
        job = data.draw(st.sampled_from(self.jobs[::-1]))  # the newest first: shrinks to it
        if not redelivered:
            self.jobs.remove(job)
        sid, token, epoch = job
        k = SessionKeys(sid)
        reply = self.call(
            "adopt", [k.spec, k.lease, k.cancel, k.state], [token, epoch, worker, TTL_MS]
        )
        if int(reply[0]) != 1:
            return
        assert sid not in self.cancelled, f"{sid}: adopted after a DELETE with no PUT since"
        url, headers, _, seq, rev = (text(part) for part in reply[1:6])
        reader = Reader(worker, sid, token, epoch, url, headers, int(rev), int(seq or 0))
        reader.generation = self.generation
        self.readers.append(reader)
        self.track(sid, TTL_MS)  # the adopted lease's deadline, before the reader starts

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        """workers.worker.Worker._renew_round for one reader."""
        reader = data.draw(st.sampled_from(self.readers))
        k = reader.keys
        verdict = int(self.call(
            "renew", [k.lease, k.cancel, k.spec],
            [reader.lease_value, TTL_MS, reader.epoch, reader.rev],
        ))  # fmt: skip
        if verdict in (1, 2):
            self.track(reader.sid, TTL_MS, "ensure")
        if verdict == 2:
            self.restart_with_stored_spec(reader)
        if verdict in (1, 2):
            # I6: after a renewal the reader runs the spec of the last PUT.
            assert (reader.url, reader.headers) == self.last_put[reader.sid], (
                f"{reader.sid}: reader on a stale spec after a renewal"
            )
        elif verdict == -1:
            self.release(reader, "stopped", "cancelled")
        elif verdict == -2:
            if not (reader.clock_valid and self.reassert(reader)):
                self.release(reader, "handoff", "fenced")
        else:
            self.release(reader, "handoff", "fenced by a newer epoch")

    @precondition(lambda self: self.readers)
    @rule(data=st.data(), count=st.integers(1, 3), stale_expected=st.booleans())
    def publish(self, data: st.DataObject, count: int, stale_expected: bool) -> None:
        """workers.reader.Reader's publish: the expected seq is the reader's own position."""
        reader = data.draw(st.sampled_from(self.readers))
        k = reader.keys
        expected = reader.seq - 1 if stale_expected and reader.seq > 0 else reader.seq
        spec, holder = self.spec(reader.sid), self.holder(reader.sid)
        state_seq = int(text(self.r.hget(k.state, "seq") or 0))
        args: list[Any] = [reader.lease_value, reader.epoch, MAXLEN, 86_400_000, "", expected]
        for n in range(count):
            head, tail = envelope_parts(reader.epoch, "m", f"{reader.sid}-{n}", "")
            args += ["m", f"{reader.sid}-{n}", "", head, tail]
        result = int(self.call("publish", [k.lease, k.spec, k.state, k.events, k.live], args))
        owner = holder == reader.lease_value and spec.get("epoch") == str(reader.epoch)
        if not spec:
            assert result == -2
        elif not owner:
            # I2: no publish accepted from a stale epoch or a non-holder.
            assert result == -1, f"{reader.sid}: publish accepted from a non-owner"
        elif expected != state_seq:
            assert result == -3
        else:
            assert result == state_seq + count
            # I3: seqs continue with no gap (from 1 again only after a data loss).
            last = self.last_seq.get(reader.sid, 0)
            if reader.sid in self.fresh_after_loss and result == count:
                self.fresh_after_loss.discard(reader.sid)
            else:
                assert result == last + count, f"{reader.sid}: seq jumped {last} -> {result}"
                self.fresh_after_loss.discard(reader.sid)
            self.last_seq[reader.sid] = result
            reader.recent += [(s, reader.epoch) for s in range(state_seq + 1, result + 1)]
        if result == -3:
            reader.seq = state_seq  # the reader reads its position back and goes on
        elif result > 0:
            reader.seq = result

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def report(self, data: st.DataObject) -> None:
        reader = data.draw(st.sampled_from(self.readers))
        k = reader.keys
        holder = self.holder(reader.sid)
        written = int(self.call("report", [k.lease, k.state], [reader.lease_value, "state",
                                                              "listening"]))  # fmt: skip
        assert written == (holder == reader.lease_value)

    @precondition(lambda self: self.readers)
    @rule(data=st.data(), roll=st.integers(0, RARE - 1))
    def hand_back(self, data: st.DataObject, roll: int) -> None:
        """A draining worker gives its lease back (workers.worker.Worker._drain)."""
        if roll:
            return
        self.release(data.draw(st.sampled_from(self.readers)), "handoff", "worker stopping")

    @precondition(lambda self: any(not r.clock_valid for r in self.readers))
    @rule(data=st.data(), roll=st.integers(0, RARE - 1))
    def fence(self, data: st.DataObject, roll: int) -> None:
        """A reader whose lease clock ran out stops without touching Redis (rare: a frozen
        reader that has not noticed yet is the adversary the scripts must refuse)."""
        if roll:
            return
        self.stop(data.draw(st.sampled_from([r for r in self.readers if not r.clock_valid])))

    @rule(sid=st.sampled_from(SIDS))
    def reconcile(self, sid: str) -> None:
        """listenerpool.control.SessionControl.reclaim_many for one due entry."""
        k = SessionKeys(sid)
        score = self.r.eval("return redis.call('ZSCORE', KEYS[1], ARGV[1])", 1,
                            k.lease_index, sid)  # fmt: skip
        token = next(self.tokens)
        outcome, epoch, due_ms = self.call(
            "claim", [k.spec, k.lease, k.cancel, k.state], ["reconcile", token, TTL_MS, "", ""]
        )
        outcome = text(outcome)
        if outcome == "claimed":
            assert sid not in self.cancelled, f"{sid}: re-claimed after a DELETE"
        if outcome == "gone":
            if score is not None:  # the score as stored, as due.lua hands it over
                self.call("untrack", [k.lease_index], [sid, text(score)])
        else:
            self.track(sid, int(due_ms))
        if outcome == "claimed":
            self.jobs.append((sid, token, int(epoch)))

    # -- the environment -------------------------------------------------------------------
    @precondition(lambda self: any(self.holder(sid) for sid in SIDS))
    @rule(sid=st.sampled_from(SIDS))
    def lapse(self, sid: str) -> None:
        """The lease runs out (no renewal for a TTL): its holder's clock ran out before."""
        holder = self.holder(sid)
        self.r.delete(SessionKeys(sid).lease)
        for reader in self.live(sid):
            if reader.lease_value == holder:
                reader.clock_valid = False

    @precondition(lambda self: self.notices)
    @rule(data=st.data(), delivered=st.booleans())
    def notice(self, data: st.DataObject, delivered: bool) -> None:
        """A control notice reaches the worker running the session, or is lost (at most once)."""
        op, sid = data.draw(st.sampled_from(self.notices))
        self.notices.remove((op, sid))
        if not delivered:
            return
        for reader in self.live(sid):
            if op == "cancel":
                self.release(reader, "stopped", "cancelled")
            else:
                self.restart_with_stored_spec(reader)

    @rule(roll=st.integers(0, 2 * RARE - 1))
    def data_loss(self, roll: int) -> None:
        """Redis restarts empty: specs, leases, tombstones, states, history, jobs, indexes."""
        if roll:
            return
        self.r.flushall()
        self.generation += 1
        self.jobs.clear()  # rq's queue lived in the same Redis
        # Every tombstone is gone: a DELETE whose notice its reader never got can be undone
        # by that reader's re-assertion (docs/design.md, what a data loss may lose).
        self.cancelled.clear()
        self.last_put.clear()
        self.fresh_after_loss.update(SIDS)

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def at_most_one_owner(self) -> None:
        # I1: at most one reader would pass the ownership check of publish and renew.
        for sid in SIDS:
            spec, holder = self.spec(sid), self.holder(sid)
            owners = [
                r for r in self.live(sid)
                if r.lease_value == holder and spec.get("epoch") == str(r.epoch)
            ]  # fmt: skip
            assert len(owners) <= 1, f"{sid}: {len(owners)} readers own the lease"

    @invariant()
    def no_two_readers_run_at_once(self) -> None:
        # I1: a reader runs until its lease clock runs out, and nobody else can take the lease
        # before that: two readers with a valid clock mean two upstream connections at once.
        # The one exception is a data loss, after which a PUT may start a new reader before
        # the old one's next renewal finds the lease taken (docs/design.md, data loss).
        for sid in SIDS:
            running = [r for r in self.live(sid) if r.clock_valid]
            current = [r for r in running if r.generation == self.generation]
            assert len(current) <= 1, (
                f"{sid}: {len(current)} readers with a valid lease clock at once"
            )

    @invariant()
    def a_desired_session_without_a_holder_is_due_in_the_lease_index(self) -> None:
        # I5: the reconciler finds every desired session nobody holds.
        for sid in SIDS:
            k = SessionKeys(sid)
            spec = self.spec(sid)
            if spec.get("desired") != "1" or self.r.exists(k.cancel):
                continue
            if text(self.r.hget(k.state, "state") or "") == "failed":
                continue
            if self.holder(sid) is None:
                assert self.r.zscore(k.lease_index, sid) is not None, (
                    f"{sid}: desired, no lease, and not in the lease index"
                )

    @invariant()
    def history_is_gap_free_and_in_order(self) -> None:
        # I3: what was accepted is numbered 1, 2, 3... in the history (since the last loss).
        for sid in SIDS:
            k = SessionKeys(sid)
            seqs = [int(text(f[b"seq"])) for _, f in self.r.xrange(k.events)]
            assert seqs == sorted(set(seqs)), f"{sid}: history out of order or duplicated"
            if seqs:
                assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"{sid}: gap {seqs}"
                assert int(text(self.r.hget(k.state, "seq") or 0)) >= seqs[-1]

    @invariant()
    def the_stored_spec_is_the_last_put(self) -> None:
        for sid in SIDS:
            spec = self.spec(sid)
            if spec and sid in self.last_put:
                assert (spec["url"], spec["headers"]) == self.last_put[sid]


def run_model(client: redis.Redis, examples: int, steps: int) -> None:
    ProtocolModel.client = client
    ProtocolModel.scripts = {name: client.register_script(source(name)) for name in NAMES}
    ProtocolModel.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        derandomize=False,
    )
    ProtocolModel.TestCase().runTest()


@pytest.mark.timeout(900)
def test_the_protocol_keeps_its_invariants(server: RedisServer) -> None:
    with redis.Redis.from_url(server.url) as client:
        run_model(client, examples=CI_EXAMPLES, steps=CI_STEPS)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_protocol_keeps_its_invariants_long_run(server: RedisServer) -> None:
    with redis.Redis.from_url(server.url) as client:
        run_model(client, examples=10 * CI_EXAMPLES, steps=CI_STEPS + 20)


def test_the_model_reads_the_scripts_it_drives() -> None:
    # A script added to the protocol must be added to the model too.
    driven = {"claim", "adopt", "renew", "publish", "report", "release", "cancel", "reassert",
              "track", "untrack"}  # fmt: skip
    assert set(NAMES) - driven == {"due"}  # due.lua only reads: the model calls claim directly
    assert json.loads(SPECS[2][1])  # the headers variant is a valid headers document
