"""The soak's history check on hand-made histories."""

from __future__ import annotations

from listenerpool.testing.harness.followers import Received
from listenerpool.testing.harness.history import (
    HistoryTotals,
    PausedWindow,
    StoredEntry,
    check_session,
    count_overlaps,
)
from listenerpool.testing.upstream import ConnectionRecord


def stream(*numbers: int, epoch: int = 1) -> list[StoredEntry]:
    return [StoredEntry(n, epoch, n) for n in numbers]


def got(*numbers: int) -> list[Received]:
    return [Received(n, 1, n) for n in numbers]


def test_a_clean_history_has_no_fault() -> None:
    t = HistoryTotals()
    check_session(t, "s", 3, stream(1, 2, 3), [(got(1, 2, 3), [])], history_may_be_dropped=False)
    assert (t.emitted, t.stored, t.delivered, t.expected_deliveries) == (3, 3, 3, 3)
    assert (t.lost, t.duplicated, t.out_of_order, t.renumbered, t.stale_epoch) == (0, 0, 0, 0, 0)


def test_losses_duplicates_and_disorder_are_counted() -> None:
    t = HistoryTotals()
    check_session(
        t, "s", 4, stream(1, 2, 4), [(got(1, 3, 2, 2, 4), [])], history_may_be_dropped=False
    )
    assert t.lost == 1  # 3 is missing from the stream
    assert (t.duplicated, t.out_of_order) == (1, 1)
    assert t.problems


def test_a_dropped_history_prefix_is_a_loss_only_without_data_loss() -> None:
    for may_drop, lost, dropped in ((True, 0, 2), (False, 2, 0)):
        t = HistoryTotals()
        check_session(t, "s", 4, stream(3, 4), [], history_may_be_dropped=may_drop)
        assert (t.lost, t.history_dropped) == (lost, dropped)


def test_client_gaps_under_a_reset_notice_are_counted_apart() -> None:
    t = HistoryTotals()
    check_session(t, "s", 5, stream(1, 2, 3, 4, 5), [(got(1, 4, 5), [(1, 4)])],
                  history_may_be_dropped=False)  # fmt: skip
    assert (t.lost, t.lost_announced, t.resets) == (0, 2, 1)


def test_renumbering_and_stale_epochs() -> None:
    t = HistoryTotals()
    entries = [StoredEntry(1, 2, 1), StoredEntry(2, 1, 2), StoredEntry(3, 2, 2)]
    check_session(t, "s", 2, entries, [], history_may_be_dropped=False)
    assert (t.stale_epoch, t.renumbered, t.duplicated) == (1, 1, 1)


def record(opened: float, closed: float | None, port: int) -> ConnectionRecord:
    return ConnectionRecord(opened, closed, port, None, None, None)


def test_overlaps_are_told_apart_from_a_paused_holder() -> None:
    t = HistoryTotals()
    sequential = [record(0, 1, 10), record(1, 2, 11), record(2, None, 12)]
    count_overlaps(t, "s", sequential, [], end=9)
    assert (t.overlaps, t.overlaps_paused) == (0, 0)

    overlapping = [record(0, 5, 10), record(4, None, 11)]
    count_overlaps(t, "s", overlapping, [], end=9)
    assert t.overlaps == 1
    paused = [PausedWindow(stopped=1, resumed=4.5, ports=frozenset({10}))]
    count_overlaps(t, "s", overlapping, paused, end=9)
    assert (t.overlaps, t.overlaps_paused) == (1, 1)
    assert t.paused_close_after_wake == [0.5]


def test_a_connection_the_kernel_completed_for_a_frozen_process_is_the_freeze() -> None:
    # The process began connecting just before SIGSTOP; the upstream accepted just after it.
    paused = [PausedWindow(stopped=1, resumed=4.5, ports=frozenset({10}))]
    t = HistoryTotals()
    count_overlaps(t, "s", [record(1.02, 4.8, 10), record(4, None, 11)], paused, end=9)
    assert (t.overlaps, t.overlaps_paused) == (0, 1)


def test_a_frozen_holder_that_closes_late_after_waking_is_a_plain_overlap() -> None:
    paused = [PausedWindow(stopped=1, resumed=4.5, ports=frozenset({10}))]
    # Closed 2 s after SIGCONT, the newer connection opened after the wake: still the freeze.
    t = HistoryTotals()
    count_overlaps(t, "s", [record(0, 6.5, 10), record(6, None, 11)], paused, end=9, wake_bound=3)
    assert (t.overlaps, t.overlaps_paused) == (0, 1)
    # Open 4 s past SIGCONT with a 3 s bound: the woken reader outlived its lease.
    t = HistoryTotals()
    count_overlaps(t, "s", [record(0, 8.5, 10), record(6, None, 11)], paused, end=9, wake_bound=3)
    assert (t.overlaps, t.overlaps_paused) == (1, 0)
    # A connection opened after the freeze on a port the frozen process had used: not its.
    t = HistoryTotals()
    count_overlaps(t, "s", [record(5, 7, 10), record(6, None, 11)], paused, end=9)
    assert (t.overlaps, t.overlaps_paused) == (1, 0)
