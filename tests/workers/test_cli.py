from __future__ import annotations

import subprocess
import sys

import pytest

from listenerpool.cli.commands import build_parser, settings_from
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(30)


def run_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_help_lists_the_flags() -> None:
    result = run_worker("--help")
    assert result.returncode == 0
    assert "--redis-url" in result.stdout and "LP_LEASE_TTL" in result.stdout


def test_missing_redis_url_is_a_one_line_error() -> None:
    result = run_worker()
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: LP_REDIS_URL (or --redis-url) is required for `listenerpool worker`"
    )


def test_bad_setting_is_named() -> None:
    result = run_worker(env={"LP_REDIS_URL": "redis://127.0.0.1:1/0", "LP_LEASE_TTL": "soon"})
    assert result.returncode == 2
    assert "LP_LEASE_TTL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_flag_exits_non_zero() -> None:
    result = run_worker("--capacity", "many")
    assert result.returncode == 2
    assert "--capacity" in result.stderr


def test_metrics_port_and_log_format_flags_mirror_their_settings() -> None:
    args = build_parser().parse_args(
        ["worker", "--metrics-port", "9100", "--log-format", "json", "--redis-url", "redis://x"]
    )
    settings = settings_from(args)
    assert (settings.metrics_port, settings.log_format) == (9100, "json")
    gateway = build_parser().parse_args(["gateway", "--log-format", "console"])
    assert settings_from(gateway).log_format == "console"
    with pytest.raises(SystemExit):  # the gateway has no metrics port of its own
        build_parser().parse_args(["gateway", "--metrics-port", "9100"])


def test_a_bad_log_format_is_named() -> None:
    result = run_worker("--log-format", "xml", env={"LP_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 2
    assert "LP_LOG_FORMAT" in result.stderr
