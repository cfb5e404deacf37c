"""The pure parts of bench/cluster_balance.py: session ids, spreads, counting by slot owner."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def balance(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("cluster_balance")


def test_session_ids_are_valid_distinct_and_reproducible(balance: ModuleType) -> None:
    from listenerpool.keys import check_session_id

    ids = balance.session_ids(500, "uuid", seed=7)
    assert len(set(ids)) == 500
    assert all(len(sid) == 32 and check_session_id(sid) for sid in ids)
    assert ids == balance.session_ids(500, "uuid", seed=7)
    assert ids != balance.session_ids(500, "uuid", seed=8)
    assert balance.session_ids(3, "sequential", seed=7) == ["user-1", "user-2", "user-3"]


def test_spread_is_max_and_min_against_the_mean(balance: ModuleType) -> None:
    assert balance.spread([6, 6, 4]) == pytest.approx((0.125, -0.25))
    assert balance.spread([10, 10, 10]) == (0.0, 0.0)
    assert balance.spread([0, 0]) == (0.0, 0.0)


def test_count_by_owner(balance: ModuleType) -> None:
    def owner(slot: int) -> str:
        return "a" if slot < 100 else "b"

    assert balance.count_by_owner([1, 5, 150, 99, 100], owner) == {"a": 3, "b": 2}
