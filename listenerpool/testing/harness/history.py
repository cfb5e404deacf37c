"""The history check of a soak run: per session, what the upstream emitted, what the Redis
stream holds and what every client received, compared. Pure: no I/O, fed with snapshots.

An upstream that honours ``Last-Event-ID`` emits events ``1..H`` of a session (``H`` its
highest number); a session's seq numbers its events from 1 without gaps, so every stored or
delivered event must have ``seq == number``. Against that:

- *lost*: a number in ``1..H`` that a client following the session never received, or that is
  missing from the stream after the stream's first entry (entries before it may only be missing
  when Redis lost its data: ``history_dropped``); a client's missing events that a reset notice
  announced (the history no longer had them) count apart as ``lost_announced``;
- *duplicated*: a number received (or stored) more than once;
- *out of order*: a number lower than the one before it;
- *renumbered*: ``seq != number``;
- *stale epoch*: a stream entry whose epoch is lower than an earlier entry's;
- *overlaps*: two upstream connections of one session open at the same moment. Those whose
  older connection was open in a SIGSTOPped process (it cannot close anything while stopped)
  and closed soon after SIGCONT are counted apart, as ``overlaps_paused``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from listenerpool.testing.harness.followers import Received
from listenerpool.testing.upstream import ConnectionRecord

__all__ = ["HistoryTotals", "PausedWindow", "StoredEntry", "check_session", "count_overlaps"]


@dataclass(frozen=True, slots=True)
class StoredEntry:
    seq: int
    epoch: int
    number: int


@dataclass(frozen=True, slots=True)
class PausedWindow:
    """A process was SIGSTOPped from ``stopped`` to ``resumed`` (monotonic) while holding
    upstream connections from ``ports`` (its local ports, listed while it was frozen)."""

    stopped: float
    resumed: float
    ports: frozenset[int]


@dataclass(slots=True)
class HistoryTotals:
    """Sums over the sessions checked; every field but the volumes must end at 0."""

    sessions: int = 0
    emitted: int = 0
    stored: int = 0
    delivered: int = 0
    expected_deliveries: int = 0
    history_dropped: int = 0  # stream entries gone with Redis data (not a loss)
    lost: int = 0  # silently: no reset notice covers them
    lost_announced: int = 0  # gone from the history before delivery, with a reset notice
    duplicated: int = 0
    out_of_order: int = 0
    renumbered: int = 0
    stale_epoch: int = 0
    overlaps: int = 0
    overlaps_paused: int = 0
    resets: int = 0
    paused_close_after_wake: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the first few, for the log
    overlap_problems: list[str] = field(default_factory=list)  # the first few overlaps

    def note(self, problem: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(problem)


def _order_faults(numbers: Sequence[int]) -> tuple[int, int]:
    """(duplicates, out-of-order steps) in a sequence of event numbers."""
    duplicates = len(numbers) - len(set(numbers))
    backwards = sum(1 for a, b in itertools.pairwise(numbers) if b < a)
    return duplicates, backwards


def _ranges(numbers: Sequence[int]) -> str:
    """``[3-5, 9]`` for 3, 4, 5, 9 (the first few ranges)."""
    parts: list[str] = []
    for n in numbers:
        if parts and parts[-1].split("-")[-1] == str(n - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{n}"
        else:
            parts.append(str(n))
    return "[" + ", ".join(parts[:5]) + (", ..." if len(parts) > 5 else "") + "]"


def check_session(
    totals: HistoryTotals,
    sid: str,
    highest: int,
    stream: Sequence[StoredEntry],
    deliveries: Iterable[tuple[Sequence[Received], Sequence[tuple[int, int]]]],
    *,
    history_may_be_dropped: bool,
) -> None:
    """Add one session to ``totals``. ``deliveries`` holds, per client following the session
    from seq 0, what it received and the reset notices it got, as ``(after, first_seq)``."""
    totals.sessions += 1
    totals.emitted += highest
    totals.stored += len(stream)
    numbers = [e.number for e in stream]
    first = numbers[0] if numbers else highest + 1
    dropped = first - 1
    if dropped and not history_may_be_dropped:
        totals.lost += dropped
        totals.note(f"{sid}: stream starts at event {first}")
    else:
        totals.history_dropped += dropped
    missing = set(range(first, highest + 1)) - set(numbers)
    if missing:
        totals.lost += len(missing)
        totals.note(f"{sid}: stream lacks {len(missing)} events, first {min(missing)}")
    duplicates, backwards = _order_faults(numbers)
    totals.duplicated += duplicates
    totals.out_of_order += backwards
    renumbered = sum(1 for e in stream if e.seq != e.number)
    totals.renumbered += renumbered
    if duplicates or backwards or renumbered:
        at = next((i for i, e in enumerate(stream) if e.seq != e.number), 0)
        around = [(e.seq, e.number, e.epoch) for e in stream[max(0, at - 2) : at + 3]]
        totals.note(
            f"{sid}: stream dup {duplicates} back {backwards} renumbered {renumbered}; "
            f"(seq, number, epoch) around the first: {around}"
        )
    top = 0
    for entry in stream:
        if entry.epoch < top:
            totals.stale_epoch += 1
            totals.note(f"{sid}: seq {entry.seq} at epoch {entry.epoch} after epoch {top}")
        top = max(top, entry.epoch)

    for received, resets in deliveries:
        got = [r.number for r in received]
        distinct = set(got)
        totals.expected_deliveries += highest
        totals.delivered += len(distinct & set(range(1, highest + 1)))
        client_missing = highest - len(distinct & set(range(1, highest + 1)))
        duplicates, backwards = _order_faults(got)
        renumbered = sum(1 for r in received if r.seq != r.number)
        announced = sum(
            1
            for n in set(range(1, highest + 1)) - distinct
            if any(after < n < first_seq for after, first_seq in resets)
        )
        totals.lost += client_missing - announced
        totals.lost_announced += announced
        totals.duplicated += duplicates
        totals.out_of_order += backwards
        totals.renumbered += renumbered
        totals.resets += len(resets)
        if client_missing or duplicates or backwards or renumbered:
            absent = sorted(set(range(1, highest + 1)) - distinct)
            totals.note(
                f"{sid}: client missed {client_missing} {_ranges(absent)} dup {duplicates} "
                f"back {backwards} renumbered {renumbered} (received {len(got)} of {highest})"
            )


def count_overlaps(
    totals: HistoryTotals,
    sid: str,
    connections: Sequence[ConnectionRecord],
    paused: Sequence[PausedWindow],
    end: float,
    explain: Callable[[float], str] | None = None,
    wake_bound: float = 5.0,
) -> None:
    """Add the session's overlapping upstream connections to ``totals`` (connections still
    open count as open until ``end``). An overlap whose older connection was held by a frozen
    process counts apart if that connection closed within ``wake_bound`` seconds of SIGCONT;
    a later close is a reader that outlived its lease after waking, a plain overlap."""
    ordered = sorted(connections, key=lambda c: c.opened)
    for i, older in enumerate(ordered):
        closed = older.closed if older.closed is not None else end
        for newer in ordered[i + 1 :]:
            if newer.opened >= closed:
                break
            # The older connection was open in a process when it was frozen (its port listed
            # while it was; the upstream may accept it just after the signal, the kernel
            # completing a connect the process began), and the newer one came after the
            # freeze: the frozen process could not close it before it woke.
            window = next(
                (
                    w
                    for w in paused
                    if older.peer_port in w.ports
                    and older.opened <= w.resumed
                    and w.stopped <= newer.opened
                    and closed - w.resumed <= wake_bound
                ),
                None,
            )
            if window is not None:
                totals.overlaps_paused += 1
                totals.paused_close_after_wake.append(max(0.0, closed - window.resumed))
            else:
                totals.overlaps += 1
                why = f" ({explain(newer.opened)})" if explain else ""
                if len(totals.overlap_problems) < 20:
                    totals.overlap_problems.append(
                        f"{sid}: connection from port {newer.peer_port} opened while the one from "
                        f"port {older.peer_port} was open (opened {newer.opened - older.opened:.2f}"
                        f" s before, closed {closed - newer.opened:.2f} s after){why}"
                    )
