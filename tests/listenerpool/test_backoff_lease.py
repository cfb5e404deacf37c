from __future__ import annotations

import pytest

from listenerpool.backoff import reconnect_delay
from listenerpool.lease import LeaseClock


def lowest(lo: float, hi: float) -> float:
    return lo


def highest(lo: float, hi: float) -> float:
    return hi


class Recorder:
    """A rand that remembers the range it was asked for and returns its middle."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def __call__(self, lo: float, hi: float) -> float:
        self.calls.append((lo, hi))
        return (lo + hi) / 2


# -- reconnect_delay ---------------------------------------------------------------------------
def test_full_jitter_spans_zero_to_the_exponential_bound() -> None:
    rand = Recorder()
    assert reconnect_delay(3, base=0.5, cap=30.0, rand=rand) == pytest.approx(2.0)
    assert rand.calls == [(0.0, 4.0)]
    assert reconnect_delay(3, base=0.5, cap=30.0, rand=lowest) == 0.0
    assert reconnect_delay(3, base=0.5, cap=30.0, rand=highest) == 4.0


def test_bound_doubles_per_attempt_until_the_cap() -> None:
    maxima = [reconnect_delay(n, base=0.5, cap=30.0, rand=highest) for n in range(8)]
    assert maxima == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


@pytest.mark.parametrize("attempt", [64, 1_000, 10**9])
def test_huge_attempt_numbers_stay_at_the_cap(attempt: int) -> None:
    assert reconnect_delay(attempt, base=0.5, cap=30.0, rand=highest) == 30.0
    assert reconnect_delay(attempt, base=0.5, cap=30.0, rand=lowest) == 0.0


def test_server_retry_is_a_floor() -> None:
    assert reconnect_delay(0, base=0.5, cap=30.0, server_retry_ms=3000, rand=lowest) == 3.0
    # A larger jittered delay wins over a small retry.
    assert reconnect_delay(5, base=0.5, cap=30.0, server_retry_ms=100, rand=highest) == 16.0


def test_server_retry_is_capped() -> None:
    delay = reconnect_delay(0, base=0.5, cap=30.0, server_retry_ms=3_600_000, rand=lowest)
    assert delay == 30.0


def test_default_rand_stays_in_bounds() -> None:
    delays = [reconnect_delay(2, base=0.5, cap=30.0) for _ in range(200)]
    assert all(0.0 <= d <= 2.0 for d in delays)
    assert len(set(delays)) > 1  # jittered, not constant


# -- LeaseClock --------------------------------------------------------------------------------
def test_must_fence_exactly_at_fence_after() -> None:
    clock = LeaseClock(confirmed_at=100.0, fence_after=8.0)
    assert not clock.must_fence(100.0)
    assert not clock.must_fence(107.999)
    assert clock.must_fence(108.0)
    assert clock.must_fence(500.0)
    assert clock.fence_deadline() == 108.0


def test_confirm_moves_the_deadline_forward() -> None:
    clock = LeaseClock(confirmed_at=100.0, fence_after=8.0)
    clock.confirm(105.0)
    assert clock.confirmed_at == 105.0
    assert not clock.must_fence(112.0)
    assert clock.must_fence(113.0)


def test_confirm_never_moves_backwards() -> None:
    """A late reply to an older renewal must not pull the fence deadline back."""
    clock = LeaseClock(confirmed_at=100.0, fence_after=8.0)
    clock.confirm(99.0)
    clock.confirm(100.0)
    assert clock.confirmed_at == 100.0
    assert clock.fence_deadline() == 108.0
