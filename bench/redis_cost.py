"""Redis's own cost per unit of pool work: CPU per published event and per lease renewal, memory
per idle session, per stored history event and per sharded subscription, each beside a plain
baseline measured in the same run on the same private ``redis-server``.

All pool work goes through the pool's own code: sessions are claimed with
:meth:`SessionControl.claim`, their listen jobs taken with ``workers.dispatch.take_queued`` and
adopted with ``adopt.lua``; renewals are ``workers.renewal.renew_all`` (``renew.lua`` plus the
lease index update); events are ``publish.lua`` called with the arguments a reader builds
(``listenerpool.envelope.envelope_parts``), through ``listenerpool.scripts.call_many``.

- **CPU**: Redis's ``used_cpu_sys + used_cpu_user`` (``INFO cpu``) over a run of operations,
  minus its idle rate (measured first) times the run's wall time, divided by the operations.
  The client pipelines, so round trips do not count. Each figure is the median of
  ``--repeat`` (3) runs.
- **publish**: ``--events`` (20,000) events of ``--payload-bytes`` (160) over
  ``--publish-sessions`` (100) sessions, one event per script call, then ``--batch`` (16) per
  call. Baseline: pipelined ``XADD`` (``MAXLEN ~``, same fields) + ``SPUBLISH`` (same
  envelope) of the same payloads. With 0 and then 2 sharded subscribers, each a raw socket
  ``SSUBSCRIBE``\\ d to every session's channel (as a gateway whose clients follow every
  session) and draining what it receives in a child process.
- **renewal**: ``--rounds`` (5) rounds of ``renew_all`` over all ``--sessions`` (10,000);
  also ``renew.lua`` alone and the index update alone. Baseline: pipelined ``PEXPIRE`` of the
  same lease keys.
- **bytes**: Redis's ``total_net_input_bytes`` / ``total_net_output_bytes`` per event (the
  last run of each publish variant): what the publisher sends, and what Redis sends back and
  to the subscribers.
- Leases are taken with a 1 h TTL so that none lapses during the run; a renewal costs the same
  whatever its TTL.
- **memory**: ``used_memory`` growth per idle session (claimed, adopted, ``listening``,
  renewed once: spec, lease, state and both index entries), per stored history event (sum of
  ``MEMORY USAGE`` of the publish sessions' streams / their entries) and per subscription (2
  subscribers to every session's channel). ``MEMORY USAGE`` of one sample session's keys is
  shown beside it.

Figures come last, as ratios against the baseline with the absolute numbers (info: no target;
``docs/scaling.md``'s capacity model uses them)::

    publish_cpu_us_1_per_round_trip_0subs: 53.58 us (6.97x plain XADD+SPUBLISH 7.69 us, ...) (info)

    .venv/bin/python bench/redis_cost.py
    .venv/bin/python bench/redis_cost.py --sessions 100000 --events 50000 --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# bench/ is sys.path[0] when this file runs as a script.
import rig
from rig_upstreams import PAYLOAD_BYTES

SESSIONS = 10_000
PUBLISH_SESSIONS = 100
EVENTS = 20_000
BATCH = 16
ROUNDS = 5
REPEAT = 3
SUBSCRIBERS = 2
WORKER_ID = "bench-cost"
LEASE_TTL = 3600.0
EVENT_TYPE = "TEXT_MESSAGE_CONTENT"
CLAIM_CONCURRENCY = 64
PIPELINE = 1000  # commands per baseline pipeline flush, as renew_all's BATCH


# ============================================================================================
# The subscriber child: raw sockets, no parsing, so it costs Redis what a gateway costs it
# ============================================================================================
def resp(*words: str) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def subscriber_child(port: int, connections: int) -> int:
    """Read channel names from stdin up to ``end``; SSUBSCRIBE each on ``connections`` sockets
    and drain them; print ``sent``; on ``count`` print the bytes received; exit on EOF."""
    channels: list[str] = []
    for line in sys.stdin:
        if line.strip() == "end":
            break
        channels.append(line.strip())
    received = [0] * connections

    def drain(i: int, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            received[i] += len(data)

    socks = []
    for i in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        socks.append(sock)
        threading.Thread(target=drain, args=(i, sock), daemon=True).start()
        for start in range(0, len(channels), 500):
            sock.sendall(resp("SSUBSCRIBE", *channels[start : start + 500]))
    print("sent", flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            print(sum(received), flush=True)
        else:
            break
    return 0


# ============================================================================================
# Measuring
# ============================================================================================
@dataclass
class Costs:
    """Medians over the repeats, in microseconds of Redis CPU per operation."""

    idle_us_per_s: float = 0.0
    claim_us: float = 0.0
    renew_all_us: float = 0.0
    renew_script_us: float = 0.0
    index_us: float = 0.0
    pexpire_us: float = 0.0
    publish: dict[tuple[int, str], float] = field(default_factory=dict)  # (subs, variant)
    # bytes into and out of Redis per event, per (subs, variant): the last run's
    publish_net: dict[tuple[int, str], tuple[float, float]] = field(default_factory=dict)
    session_bytes: float = 0.0
    session_keys: dict[str, int] = field(default_factory=dict)  # MEMORY USAGE of one session
    index_entry_bytes: float = 0.0
    event_bytes: float = 0.0
    baseline_event_bytes: float = 0.0
    subscription_bytes: float = 0.0
    history_len: float = 0.0


class Probe:
    """Redis CPU and memory as the server reports them."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.idle_per_s = 0.0
        self.net_per_op = (0.0, 0.0)  # bytes into / out of Redis per operation, last per_op

    async def net(self) -> tuple[int, int]:
        info = await self.redis.info("stats")
        return int(info["total_net_input_bytes"]), int(info["total_net_output_bytes"])

    async def cpu(self) -> float:
        info = await self.redis.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    async def memory(self) -> int:
        return int((await self.redis.info("memory"))["used_memory"])

    async def calibrate(self, seconds: float = 2.0) -> float:
        cpu0, t0 = await self.cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        self.idle_per_s = (await self.cpu() - cpu0) / (time.monotonic() - t0)
        return self.idle_per_s

    async def per_op(self, work: Callable[[], Awaitable[int]]) -> float:
        """Redis CPU microseconds per operation of ``work`` (which returns its count)."""
        (in0, out0), cpu0, t0 = await self.net(), await self.cpu(), time.monotonic()
        count = await work()
        busy = await self.cpu() - cpu0 - self.idle_per_s * (time.monotonic() - t0)
        in1, out1 = await self.net()
        self.net_per_op = ((in1 - in0) / count, (out1 - out0) / count)
        return max(busy, 0.0) / count * 1e6


def session_ids(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [uuid.UUID(int=rng.getrandbits(128), version=4).hex for _ in range(count)]


def payload(n: int, size: int) -> str:
    """A JSON object of exactly ``size`` bytes (when ``size`` allows)."""
    head = f'{{"t": {time.time_ns()}, "n": {n}, "pad": "'
    return head + "x" * max(size - len(head) - 2, 0) + '"}'


class Bench:
    def __init__(self, url: str, opts: argparse.Namespace) -> None:
        from listenerpool.connections import async_redis, listen_queue, sync_redis
        from listenerpool.control import SessionControl
        from listenerpool.settings import load_settings

        self.opts = opts
        # Leases must outlast the whole run (the TTL does not change what a renewal costs).
        self.settings = load_settings(redis_url=url, lease_ttl=LEASE_TTL)
        self.redis = async_redis(self.settings)
        self.sync = sync_redis(self.settings)
        self.queue = listen_queue(self.sync, self.settings)
        self.control = SessionControl(self.redis, self.queue, self.settings)
        self.scripts = self.control.scripts
        self.probe = Probe(self.redis)
        self.ttl_ms = int(self.settings.lease_ttl * 1000)
        self.held: list[Any] = []  # workers.session.HeldSession
        self.seq: dict[str, int] = {}
        self.n = 0
        self.costs = Costs()

    async def close(self) -> None:
        await self.redis.aclose()
        self.sync.close()

    # -- sessions ------------------------------------------------------------------------------
    async def bring_up(self, sids: Sequence[str]) -> None:
        """Claim, take the jobs, adopt, report listening and renew once: idle sessions."""
        from listenerpool.keys import SessionKeys
        from listenerpool.lease import LeaseClock
        from listenerpool.scripts import call_many
        from listenerpool.spec import UpstreamSpec
        from workers.dispatch import take_queued
        from workers.renewal import RenewVerdict, renew_all
        from workers.session import HeldSession

        async def claim_all() -> int:
            for start in range(0, len(sids), CLAIM_CONCURRENCY):
                chunk = sids[start : start + CLAIM_CONCURRENCY]
                await asyncio.gather(*(self.control.claim(sid, self.url(sid)) for sid in chunk))
            return len(sids)

        mem0 = await self.probe.memory()
        self.costs.claim_us = await self.probe.per_op(claim_all)
        jobs = []
        while batch := await asyncio.to_thread(take_queued, self.queue, 1000):
            jobs += batch
        if len(jobs) != len(sids):
            raise rig.BenchError(f"{len(jobs)} listen jobs for {len(sids)} claims")
        for start in range(0, len(jobs), PIPELINE):
            chunk = jobs[start : start + PIPELINE]
            keysets = [SessionKeys(job.sid) for job in chunk]
            adopted = await call_many(
                self.redis,
                self.scripts.adopt,
                [
                    ([k.spec, k.lease, k.cancel, k.state], [job.token, job.epoch, WORKER_ID,
                                                            self.ttl_ms])
                    for k, job in zip(keysets, chunk, strict=True)
                ],
            )  # fmt: skip
            if any(int(reply[0]) != 1 for reply in adopted):
                raise rig.BenchError("a listen job could not be adopted")
            values = [f"{WORKER_ID}:{job.token}" for job in chunk]
            await call_many(
                self.redis,
                self.scripts.report,
                [
                    ([k.lease, k.state], [value, "state", "listening"])
                    for k, value in zip(keysets, values, strict=True)
                ],
            )
            self.held += [
                HeldSession(
                    keys=k,
                    token=job.token,
                    epoch=job.epoch,
                    lease_value=value,
                    spec=UpstreamSpec(self.url(job.sid)),
                    clock=LeaseClock(confirmed_at=0.0, fence_after=8.0),
                    phase="listening",
                    # The revision adopt read: renew.lua answers SPEC_CHANGED to an older one.
                    spec_rev=int(reply[5] or 0),
                )
                for k, job, value, reply in zip(keysets, chunk, values, adopted, strict=True)
            ]
        verdicts = await renew_all(self.redis, self.scripts, self.held, self.ttl_ms)
        if any(v is not RenewVerdict.RENEWED for v in verdicts):
            raise rig.BenchError("a renewal failed during bring-up")
        self.costs.session_bytes = (await self.probe.memory() - mem0) / len(sids)
        sample = self.held[0].keys
        for name in ("spec", "lease", "state"):
            used = await self.redis.memory_usage(getattr(sample, name), samples=0)
            self.costs.session_keys[name] = int(used or 0)
        from listenerpool import keys

        index_bytes = 0
        for bucket in range(keys.INDEX_BUCKETS):
            for key in (keys.lease_index(bucket), keys.sessions_index(bucket)):
                index_bytes += int(await self.redis.memory_usage(key, samples=0) or 0)
        self.costs.index_entry_bytes = index_bytes / len(sids)

    def url(self, sid: str) -> str:
        return f"http://127.0.0.1:9/events/{sid}"

    # -- renewals ------------------------------------------------------------------------------
    async def renewals(self) -> None:
        from listenerpool import index
        from listenerpool.scripts import call_many
        from workers.renewal import renew_all

        held, rounds = self.held, self.opts.rounds

        async def full() -> int:
            for _ in range(rounds):
                await renew_all(self.redis, self.scripts, held, self.ttl_ms)
            return rounds * len(held)

        async def script_only() -> int:
            for _ in range(rounds):
                for start in range(0, len(held), PIPELINE):
                    await call_many(
                        self.redis,
                        self.scripts.renew,
                        [
                            ([s.keys.lease, s.keys.cancel, s.keys.spec],
                             [s.lease_value, self.ttl_ms, s.epoch])
                            for s in held[start : start + PIPELINE]
                        ],
                    )  # fmt: skip
            return rounds * len(held)

        async def index_only() -> int:
            for _ in range(rounds):
                for start in range(0, len(held), PIPELINE):
                    dues = {s.sid: self.ttl_ms for s in held[start : start + PIPELINE]}
                    await index.track(self.redis, self.scripts, dues, listing=index.Listing.ENSURE)
            return rounds * len(held)

        async def pexpire() -> int:
            for _ in range(rounds):
                for start in range(0, len(held), PIPELINE):
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for s in held[start : start + PIPELINE]:
                            pipe.pexpire(s.keys.lease, self.ttl_ms)
                        await pipe.execute()
            return rounds * len(held)

        samples: dict[str, list[float]] = {"full": [], "script": [], "index": [], "pexpire": []}
        for _ in range(self.opts.repeat):
            samples["pexpire"].append(await self.probe.per_op(pexpire))
            samples["full"].append(await self.probe.per_op(full))
            samples["script"].append(await self.probe.per_op(script_only))
            samples["index"].append(await self.probe.per_op(index_only))
        self.costs.pexpire_us = statistics.median(samples["pexpire"])
        self.costs.renew_all_us = statistics.median(samples["full"])
        self.costs.renew_script_us = statistics.median(samples["script"])
        self.costs.index_us = statistics.median(samples["index"])

    # -- publishing ----------------------------------------------------------------------------
    def publishers(self) -> list[Any]:
        return self.held[: self.opts.publish_sessions]

    def base_keys(self) -> list[tuple[str, str]]:
        from listenerpool.keys import SessionKeys

        return [
            (k.events, k.live)
            for k in (SessionKeys(f"base-{i}") for i in range(self.opts.publish_sessions))
        ]

    async def publish_pool(self, per_call: int) -> int:
        """``--events`` events through publish.lua, ``per_call`` per script call."""
        from listenerpool.envelope import envelope_parts
        from listenerpool.scripts import call_many

        held = self.publishers()
        maxlen = self.settings.history_maxlen
        history_ttl_ms = int(self.settings.history_ttl * 1000)
        done = 0
        while done < self.opts.events:
            calls = []
            for s in held:
                args: list[str | int] = [s.lease_value, s.epoch, maxlen, history_ttl_ms]
                events = []
                for _ in range(per_call):
                    self.n += 1
                    data = payload(self.n, self.opts.payload_bytes)
                    head, tail = envelope_parts(s.epoch, EVENT_TYPE, data, str(self.n))
                    events += [EVENT_TYPE, data, str(self.n), head, tail]
                args += [str(self.n), self.seq.get(s.sid, 0), *events]
                calls.append(([s.keys.lease, s.keys.spec, s.keys.state, s.keys.events,
                               s.keys.live], args))  # fmt: skip
            replies = await call_many(self.redis, self.scripts.publish, calls)
            for s, reply in zip(held, replies, strict=True):
                if int(reply) < 0:
                    raise rig.BenchError(f"publish.lua refused: {reply}")
                self.seq[s.sid] = int(reply)
            done += per_call * len(held)
        return done

    async def publish_each(self) -> int:
        """``--events`` events, one per publish.lua call, each call its own round trip from
        concurrent tasks, as readers publish (one ``Scripts.publish`` call per upstream read)."""
        from listenerpool.envelope import envelope_parts

        maxlen = self.settings.history_maxlen
        history_ttl_ms = int(self.settings.history_ttl * 1000)

        async def one(s: Any) -> None:
            self.n += 1
            data = payload(self.n, self.opts.payload_bytes)
            head, tail = envelope_parts(s.epoch, EVENT_TYPE, data, str(self.n))
            reply = await self.scripts.publish(
                keys=[s.keys.lease, s.keys.spec, s.keys.state, s.keys.events, s.keys.live],
                args=[s.lease_value, s.epoch, maxlen, history_ttl_ms, str(self.n),
                      self.seq.get(s.sid, 0), EVENT_TYPE, data, str(self.n), head, tail],
            )  # fmt: skip
            if int(reply) < 0:
                raise rig.BenchError(f"publish.lua refused: {reply}")
            self.seq[s.sid] = int(reply)

        held = self.publishers()
        done = 0
        while done < self.opts.events:
            await asyncio.gather(*(one(s) for s in held))
            done += len(held)
        return done

    async def publish_plain(self) -> int:
        """The baseline: pipelined XADD + SPUBLISH of the same payloads and envelopes."""
        from listenerpool.envelope import envelope_parts

        maxlen = self.settings.history_maxlen
        targets = self.base_keys()
        done = 0
        while done < self.opts.events:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i, (events, live) in enumerate(targets):
                    self.n += 1
                    seq = self.seq[f"base-{i}"] = self.seq.get(f"base-{i}", 0) + 1
                    data = payload(self.n, self.opts.payload_bytes)
                    head, tail = envelope_parts(1, EVENT_TYPE, data, str(self.n))
                    pipe.xadd(
                        events,
                        {"seq": seq, "epoch": 1, "event": EVENT_TYPE, "data": data,
                         "uid": str(self.n)},
                        id=f"{seq}-0", maxlen=maxlen, approximate=True,
                    )  # fmt: skip
                    pipe.spublish(live, f"{head}{seq}{tail}")
                await pipe.execute()
            done += len(targets)
        return done

    async def publishing(self, subscribers: int) -> None:
        variants: dict[str, Callable[[], Awaitable[int]]] = {
            "plain": self.publish_plain,
            "1": lambda: self.publish_pool(1),
            "each": self.publish_each,
            str(self.opts.batch): lambda: self.publish_pool(self.opts.batch),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(self.opts.repeat):
            for name, work in variants.items():
                samples[name].append(await self.probe.per_op(work))
                self.costs.publish_net[(subscribers, name)] = self.probe.net_per_op
        for name, values in samples.items():
            self.costs.publish[(subscribers, name)] = statistics.median(values)

    async def history_memory(self) -> None:
        """Bytes per stored event: MEMORY USAGE of the streams over their lengths."""
        for which, keys_of in (
            ("pool", [s.keys.events for s in self.publishers()]),
            ("plain", [events for events, _ in self.base_keys()]),
        ):
            used = entries = 0
            for key in keys_of:
                used += int(await self.redis.memory_usage(key, samples=0) or 0)
                entries += int(await self.redis.xlen(key))
            if which == "pool":
                self.costs.event_bytes = used / entries
                self.costs.history_len = entries / len(keys_of)
            else:
                self.costs.baseline_event_bytes = used / entries

    def channels(self) -> list[str]:
        return [s.keys.live for s in self.held] + [live for _, live in self.base_keys()]

    async def subscribed(self, channel: str, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            reply = await self.redis.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            if int(reply[1]) >= count:
                return
            if time.monotonic() > deadline:
                raise rig.BenchError(f"subscribers not on {channel} within {timeout:g}s")
            await asyncio.sleep(0.05)


# ============================================================================================
# Report
# ============================================================================================
def print_report(costs: Costs, opts: argparse.Namespace, machine: str, load: str) -> None:
    b = str(opts.batch)
    print()
    print(f"redis cost: {machine}; load average {load}")
    print(
        f"  Redis idle CPU {costs.idle_us_per_s:.0f} us/s (subtracted); medians of "
        f"{opts.repeat} runs; {opts.payload_bytes}-byte payloads"
    )
    print(
        f"  {'per event':<34} {'CPU us, 0 subs':>14} {'CPU us, 2 subs':>14} "
        f"{'bytes in':>9} {'bytes out, 0 / 2 subs':>22}"
    )
    for name, label in (
        ("plain", "plain XADD + SPUBLISH (baseline)"),
        ("1", "publish.lua, 1 event per call"),
        ("each", "same, each call its own round trip"),
        (b, f"publish.lua, {b} events per call"),
    ):
        values = [costs.publish.get((n, name)) for n in (0, SUBSCRIBERS)]
        cells = [f"{v:>14.2f}" if v is not None else f"{'-':>14}" for v in values]
        net0 = costs.publish_net.get((0, name), (0.0, 0.0))
        net2 = costs.publish_net.get((SUBSCRIBERS, name), (0.0, 0.0))
        print(
            f"  {label:<34} {cells[0]} {cells[1]} {net0[0]:>9.0f} "
            f"{f'{net0[1]:.0f} / {net2[1]:.0f}':>22}"
        )
    print(
        f"  renewal: renew_all {costs.renew_all_us:.2f} us = renew.lua {costs.renew_script_us:.2f}"
        f" + index {costs.index_us:.2f} (measured apart); PEXPIRE {costs.pexpire_us:.2f} us"
    )
    print(f"  claim (SessionControl.claim, with its rq enqueue): {costs.claim_us:.1f} us")
    keys_text = ", ".join(f"{k} {v}" for k, v in costs.session_keys.items())
    print(
        f"  idle session: {costs.session_bytes:,.0f} bytes of used_memory "
        f"(MEMORY USAGE of one: {keys_text}; index entries {costs.index_entry_bytes:.0f} per "
        f"session)"
    )
    print(
        f"  history: {costs.event_bytes:.0f} bytes per stored event "
        f"({costs.history_len:,.0f} entries per stream; plain XADD streams "
        f"{costs.baseline_event_bytes:.0f})"
    )
    print(f"  subscription: {costs.subscription_bytes:.0f} bytes per session per subscriber")
    print()
    for subs in (0, SUBSCRIBERS):
        plain = costs.publish.get((subs, "plain"))
        if not plain:
            continue
        for name, label in (
            ("1", "1_per_call"),
            ("each", "1_per_round_trip"),
            (b, f"{b}_per_call"),
        ):
            ours = costs.publish[(subs, name)]
            rig.figure(
                f"publish_cpu_us_{label}_{subs}subs",
                f"{ours:.2f} us ({ours / plain:.2f}x plain XADD+SPUBLISH {plain:.2f} us, "
                "pipelined)",
            )
    rig.figure(
        "renew_cpu_us",
        f"{costs.renew_all_us:.2f} us ({costs.renew_all_us / costs.pexpire_us:.2f}x plain "
        f"PEXPIRE {costs.pexpire_us:.2f} us; renew.lua {costs.renew_script_us:.2f} + index "
        f"{costs.index_us:.2f})",
    )
    rig.figure("claim_cpu_us", f"{costs.claim_us:.1f} us")
    rig.figure("memory_per_idle_session", f"{costs.session_bytes:,.0f} bytes")
    ratio = costs.event_bytes / max(costs.baseline_event_bytes, 1.0)
    rig.figure(
        "memory_per_history_event",
        f"{costs.event_bytes:.0f} bytes ({ratio:.2f}x plain XADD "
        f"{costs.baseline_event_bytes:.0f} bytes)",
    )
    rig.figure("memory_per_subscription", f"{costs.subscription_bytes:.0f} bytes")


# ============================================================================================
# Main
# ============================================================================================
async def measure(url: str, opts: argparse.Namespace, children: rig.Children) -> Costs:
    bench = Bench(url, opts)
    try:
        await bench.scripts.preload(bench.redis)
        bench.costs.idle_us_per_s = await bench.probe.calibrate() * 1e6
        sids = session_ids(opts.sessions, opts.seed)
        print(f"  {len(sids):,} idle sessions", flush=True)
        await bench.bring_up(sids)
        print("  renewals", flush=True)
        await bench.renewals()
        print("  publishing, 0 subscribers", flush=True)
        await bench.publishing(0)
        await bench.history_memory()
        print(f"  {SUBSCRIBERS} subscribers", flush=True)
        mem0 = await bench.probe.memory()
        channels = bench.channels()
        proc = children.spawn(
            [sys.executable, __file__, "_subscriber", "--port", str(opts.port),
             "--connections", str(SUBSCRIBERS)]
        )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(("\n".join(channels) + "\nend\n").encode())
        if rig.read_line(proc, 60, "subscriber start") != "sent":
            raise rig.BenchError("subscriber: unexpected greeting")
        await bench.subscribed(channels[-1], SUBSCRIBERS)
        bench.costs.subscription_bytes = (await bench.probe.memory() - mem0) / (
            SUBSCRIBERS * len(channels)
        )
        print(f"  publishing, {SUBSCRIBERS} subscribers", flush=True)
        await bench.publishing(SUBSCRIBERS)
        rig.send_line(proc, "count")
        if int(rig.read_line(proc, 30, "subscriber count")) <= 0:
            raise rig.BenchError("the subscribers received nothing")
        rig.Children.stop(proc)
        return bench.costs
    finally:
        await bench.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = rig.bench_parser(__doc__)
    sub = parser.add_subparsers(dest="child")
    s = sub.add_parser("_subscriber")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--connections", type=int, default=SUBSCRIBERS)
    parser.add_argument("--sessions", type=int, default=SESSIONS, help="idle sessions (10000)")
    parser.add_argument(
        "--publish-sessions", type=int, default=PUBLISH_SESSIONS, help="sessions publishing (100)"
    )
    parser.add_argument("--events", type=int, default=EVENTS, help="events per run (20000)")
    parser.add_argument("--batch", type=int, default=BATCH, help="events per batched call (16)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="renewal rounds per run (5)")
    parser.add_argument("--repeat", type=int, default=REPEAT, help="runs per figure (3)")
    parser.add_argument("--payload-bytes", type=int, default=PAYLOAD_BYTES, help="(160)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the session ids (1)")
    opts = parser.parse_args(argv)
    if opts.child is None and not 0 < opts.publish_sessions <= opts.sessions:
        parser.error("--publish-sessions must be between 1 and --sessions")
    return opts


def run(opts: argparse.Namespace) -> int:
    machine = rig.machine_line()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"redis cost bench: {machine}; load average at the start {load}", flush=True)
    with rig.Rig() as bench:
        server = bench.redis()
        opts.port = server.port
        machine += f", Redis {rig.redis_version(server.url)}"
        costs = asyncio.run(measure(server.url, opts, bench.children))
        end_load = " ".join(f"{v:.2f}" for v in os.getloadavg())
        print_report(costs, opts, machine, f"{load} at the start, {end_load} at the end")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child == "_subscriber":
        return subscriber_child(opts.port, opts.connections)
    return rig.run_guarded(run, opts)


if __name__ == "__main__":
    sys.exit(main())
