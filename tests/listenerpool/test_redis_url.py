"""LP_REDIS_URL: one server, a cluster or Sentinel, and clear errors for everything else."""

from __future__ import annotations

import subprocess
import sys

import pytest

from listenerpool.redis_url import InvalidRedisUrl, RedisKind, parse_redis_url
from listenerpool.settings import SettingsError, load_settings
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "redis://h", "rediss://:pw@h:6380/2", "unix:///tmp/r.sock"]
)
def test_single_server_urls_pass_through(url: str) -> None:
    target = parse_redis_url(url)
    assert (target.kind, target.url) == (RedisKind.SINGLE, url)


def test_a_cluster_url_lists_its_seed_nodes() -> None:
    target = parse_redis_url("redis+cluster://user:s%40cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
    assert target.kind is RedisKind.CLUSTER
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert (target.username, target.password, target.ssl) == ("user", "s@cret", False)
    assert parse_redis_url("rediss+cluster://h:1").ssl


def test_a_sentinel_url_names_the_master_and_db() -> None:
    target = parse_redis_url("redis+sentinel://:pw@s1:26379,s2,s3:26380/mymaster/3")
    assert target.kind is RedisKind.SENTINEL
    assert target.nodes == (("s1", 26379), ("s2", 26379), ("s3", 26380))
    assert (target.master, target.db, target.password) == ("mymaster", 3, "pw")
    assert target.sentinel_password is None
    other = parse_redis_url("redis+sentinel://s1:26379/m?sentinel_password=spw")
    assert (other.master, other.db, other.sentinel_password) == ("m", 0, "spw")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:6379", "is not a URL"),
        ("http://h:6379", "unknown scheme 'http'"),
        ("redis://h1:6379,h2:6379", "use redis+cluster://"),
        ("redis://h:99999", "port"),
        ("redis://h:6379/zero", "database 'zero' is not a number"),
        ("redis+cluster://h1", "needs a port"),
        ("redis+cluster://h1:7000,,h2:7001", "empty host"),
        ("redis+cluster://h1:7000/0", "takes no path"),
        ("redis+cluster://h1:x", "port 'x'"),
        ("redis+sentinel://s1:26379", "needs the master name"),
        ("redis+sentinel://s1:26379/m/x", "database 'x' is not a number"),
        ("redis+sentinel://s1:26379/m?foo=1", "unknown parameters"),
    ],
)
def test_bad_urls_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(InvalidRedisUrl, match=problem.replace("(", r"\(").replace("+", r"\+")):
        parse_redis_url(url)


def test_an_error_does_not_show_the_password() -> None:
    with pytest.raises(InvalidRedisUrl) as caught:
        parse_redis_url("redis+cluster://:hunter2@h1")
    assert "hunter2" not in str(caught.value)


def test_settings_refuse_a_bad_url_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match=r"LP_REDIS_URL: .*needs the master name"):
        load_settings(redis_url="redis+sentinel://s1:26379")


def test_the_cli_exits_non_zero_on_a_bad_url() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "workers"],
        env={"LP_REDIS_URL": "redis+cluster://h1", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "LP_REDIS_URL" in proc.stderr and "needs a port" in proc.stderr
