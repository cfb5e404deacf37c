from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from listenerpool.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own environment must not leak LP_ settings into the defaults."""
    for name in list(os.environ):
        if name.startswith("LP_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_design() -> None:
    s = load_settings()
    assert s.redis_url is None
    assert s.lease_ttl == 10.0
    assert s.idle_timeout == 45.0
    assert s.backoff_base == 0.5
    assert s.backoff_cap == 30.0
    assert s.worker_capacity == 10_000
    assert s.history_maxlen == 10_000
    assert s.history_ttl == 24 * 3600
    assert s.max_event_bytes == 1024 * 1024
    assert s.log_level == "INFO"
    assert s.queue_name == "lp-listen"


def test_lp_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LP_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("LP_LEASE_TTL", "4.5")
    monkeypatch.setenv("LP_WORKER_CAPACITY", "7")
    monkeypatch.setenv("LP_LOG_LEVEL", "DEBUG")
    s = load_settings()
    assert s.redis_url == "redis://example:6380/2"
    assert s.lease_ttl == 4.5
    assert s.worker_capacity == 7
    assert s.log_level == "DEBUG"


def test_keyword_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LP_LEASE_TTL", "4.5")
    assert load_settings(lease_ttl=6).lease_ttl == 6.0


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("LP_LEASE_TTL", "abc"),
        ("LP_LEASE_TTL", "-1"),
        ("LP_IDLE_TIMEOUT", "0"),
        ("LP_WORKER_CAPACITY", "-5"),
        ("LP_MAX_EVENT_BYTES", "12"),
        ("LP_LOG_LEVEL", "LOUD"),
        ("LP_WORKER_ID", "has space"),
    ],
)
def test_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=env):
        load_settings()


def test_unknown_keyword_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="LP_LEASE_TLL"):
        load_settings(lease_tll=3)


def test_every_bad_setting_is_named_in_one_error() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(lease_ttl="abc", worker_capacity=0)
    assert "LP_LEASE_TTL" in str(info.value)
    assert "LP_WORKER_CAPACITY" in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"backoff_base": 2.0, "backoff_cap": 1.0},
        {"lease_ttl": 9.0, "lease_margin": 6.0},  # must stay below 2/3 of the TTL
        {"lease_ttl": 9.0, "reconcile_interval": 3.5},  # at most ttl/3
    ],
)
def test_inconsistent_settings_are_refused(overrides: dict[str, float]) -> None:
    with pytest.raises(SettingsError):
        load_settings(**overrides)


def test_backoff_cap_below_base_names_the_lp_variable() -> None:
    with pytest.raises(SettingsError, match="LP_BACKOFF_CAP"):
        load_settings(backoff_base=2.0, backoff_cap=1.0)


def test_derived_intervals_default_to_fractions_of_the_ttl() -> None:
    s = load_settings(lease_ttl=9.0)
    assert s.renew_interval == pytest.approx(3.0)
    assert s.fence_after == pytest.approx(9.0 - 9.0 / 5)
    assert s.reconcile_period == pytest.approx(3.0)


def test_derived_intervals_follow_explicit_margin_and_period() -> None:
    s = load_settings(lease_ttl=9.0, lease_margin=1.5, reconcile_interval=2.0)
    assert s.fence_after == pytest.approx(7.5)
    assert s.reconcile_period == 2.0
    assert s.renew_interval == pytest.approx(3.0)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.lease_ttl = 1.0  # type: ignore[misc]
    assert isinstance(s, Settings)
