"""What a held session remembers of its recent events for a write-back after Redis lost its
data: the newest ones in a row, at most ``LP_RESTORE_EVENTS`` of them and at most
``LP_RESTORE_BYTES`` of memory, whatever the size of the events."""

from __future__ import annotations

from typing import Any

import pytest

from listenerpool.keys import SessionKeys
from listenerpool.lease import LeaseClock
from listenerpool.settings import load_settings
from listenerpool.spec import UpstreamSpec
from workers.session import EVENT_OVERHEAD, HeldSession, RecentLimit, event_size, recent_limit


def held() -> HeldSession:
    return HeldSession(
        SessionKeys("mem-1"),
        "token",
        1,
        "w1:token",
        UpstreamSpec.from_redis("http://127.0.0.1:9/events", "{}"),
        LeaseClock(confirmed_at=0.0, fence_after=10.0),
    )


def events(first: int, count: int, data: str) -> list[tuple[str, str, str]]:
    return [("message", data, f"id-{n}") for n in range(first, first + count)]


def kept(s: HeldSession) -> list[int]:
    return [event.seq for event in s.recent or ()]


def counted(s: HeldSession) -> int:
    return sum(event_size(e.type, e.data, e.id) for e in s.recent or ())


def test_at_most_the_number_of_events_asked_for_the_oldest_going_first() -> None:
    s = held()
    s.remember(1, 1, events(1, 5, "x"), RecentLimit(3, 1 << 20))
    s.remember(6, 2, events(6, 2, "y"), RecentLimit(3, 1 << 20))
    assert kept(s) == [5, 6, 7]
    assert [e.epoch for e in s.recent or ()] == [1, 2, 2]
    assert s.recent_size == counted(s)


def test_large_events_are_kept_within_the_size_whatever_their_number() -> None:
    s = held()
    data = "d" * 1000
    one = event_size("message", data, "id-10")
    size = 3 * one + EVENT_OVERHEAD  # room for three, not four
    s.remember(1, 1, events(1, 20, data), RecentLimit(64, size))
    assert kept(s) == [18, 19, 20]
    assert s.recent_size == counted(s) <= size


def test_an_event_larger_than_the_whole_size_leaves_nothing_older_behind_it() -> None:
    """What is kept is always the newest events in a row: a write-back never puts back older
    events with a gap above them."""
    s = held()
    s.remember(1, 1, events(1, 3, "small"), RecentLimit(64, 4096))
    assert kept(s) == [1, 2, 3]
    s.remember(4, 1, [("message", "b" * 5000, "id-4")], RecentLimit(64, 4096))
    assert kept(s) == []
    assert s.recent_size == 0
    s.remember(5, 1, events(5, 1, "small"), RecentLimit(64, 4096))
    assert kept(s) == [5]


@pytest.mark.parametrize("limit", [RecentLimit(0, 4096), RecentLimit(64, 0)])
def test_nothing_is_kept_when_either_bound_is_zero(limit: RecentLimit) -> None:
    s = held()
    s.remember(1, 1, events(1, 3, "x"), limit)
    assert s.recent is None and s.recent_size == 0


def test_a_history_read_is_kept_within_the_same_bounds() -> None:
    s = held()
    data = "h" * 2000
    entries: list[Any] = [  # XREVRANGE: newest first
        (f"{seq}-0".encode(), {b"seq": str(seq).encode(), b"epoch": b"3", b"event": b"message",
                               b"data": data.encode(), b"uid": f"u{seq}".encode()})
        for seq in range(10, 0, -1)
    ]  # fmt: skip
    size = 2 * event_size("message", data, "u10")
    s.remember_history(entries, RecentLimit(64, size), after=0, upto=10)
    assert kept(s) == [9, 10]
    assert s.recent_size == counted(s)


def test_a_history_read_after_published_events_goes_on_from_them() -> None:
    """A reader whose publish reply was lost reads the events in between from the history:
    they follow what it remembers, and the oldest go first beyond the bounds."""
    s = held()
    s.remember(1, 1, events(1, 3, "p"), RecentLimit(5, 1 << 20))
    entries: list[Any] = [
        (f"{seq}-0".encode(), {b"seq": str(seq).encode(), b"epoch": b"1", b"event": b"message",
                               b"data": b"h", b"uid": f"u{seq}".encode()})
        for seq in range(7, 0, -1)
    ]  # fmt: skip
    entries.insert(2, (b"5-1", {b"event": b"message"}))  # no seq: not an event of ours
    s.remember_history(entries, RecentLimit(5, 1 << 20), after=3, upto=6)
    assert kept(s) == [2, 3, 4, 5, 6]
    assert [e.data for e in s.recent or ()] == ["p", "p", "h", "h", "h"]
    assert s.recent_size == counted(s)


def test_the_bounds_come_from_the_settings() -> None:
    settings = load_settings(restore_events=8, restore_bytes=1000)
    assert recent_limit(settings) == RecentLimit(8, 1000)
    assert recent_limit(load_settings()) == RecentLimit(64, 32 * 1024)
