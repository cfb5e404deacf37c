"""The soak's fault injection against a real topology: a fault does what it names, and no more."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from listenerpool.testing.harness.faults import POOL_CHANNELS
from listenerpool.testing.harness.redis_cluster import HOST, wait_for
from listenerpool.testing.harness.redis_sentinel import RedisSentinels

SENTINELS = 3


@pytest.fixture
def sentinels() -> Iterator[RedisSentinels]:
    with RedisSentinels(sentinels=SENTINELS, down_after_ms=1000) as group:
        yield group


def _clients(port: int) -> list[dict[str, str]]:
    with redis.Redis(HOST, port, socket_timeout=2.0, decode_responses=True) as client:
        return list(client.client_list())


def _sentinel_pubsub_links(port: int) -> set[str]:
    """Ids of the Sentinels' pub/sub connections to the node on ``port``."""
    return {
        c["id"]
        for c in _clients(port)
        if c["name"].startswith("sentinel-") and c["name"].endswith("-pubsub")
    }


@pytest.mark.timeout(60)
def test_cutting_the_control_channel_leaves_the_sentinels_links_alone(
    sentinels: RedisSentinels,
) -> None:
    """``spec_change_notice_lost`` takes every channel but ``POOL_CHANNELS`` from the default
    user, which Sentinels use too. Their hello channel must stay: a Sentinel whose pub/sub link
    Redis drops counts the primary as down while it reconnects, and two of them at once fail
    over a primary that is alive, so that both nodes take writes for seconds (a second reader
    per session, in a soak run)."""
    ports = [server.port for server in sentinels.servers()]
    wait_for(
        lambda: all(len(_sentinel_pubsub_links(port)) == SENTINELS for port in ports),
        20,
        "every Sentinel subscribed on every data node",
    )
    links = {port: _sentinel_pubsub_links(port) for port in ports}
    primary = sentinels.primary_port()
    # The pool's subscription to the control channel, which the fault is there to cut.
    pool = redis.Redis(HOST, primary, socket_timeout=2.0, client_name="pool-ctl")
    control = pool.pubsub()
    control.ssubscribe("lp:ctl")
    wait_for(
        lambda: any(c["name"] == "pool-ctl" for c in _clients(primary)),
        5,
        "the control subscription open",
    )
    try:
        for port in ports:
            with redis.Redis(HOST, port, socket_timeout=2.0) as client:
                client.execute_command("ACL", "SETUSER", "default", "resetchannels", *POOL_CHANNELS)
        wait_for(
            lambda: not any(c["name"] == "pool-ctl" for c in _clients(primary)),
            5,
            "the control subscription dropped",
        )
        # Redis drops every affected subscriber in the same pass, so by now it would have
        # dropped the Sentinels' too.
        for port in ports:
            assert links[port] <= _sentinel_pubsub_links(port), f"node {port}"
    finally:
        control.close()
        pool.close()
        for port in ports:
            with redis.Redis(HOST, port, socket_timeout=2.0) as client:
                client.execute_command("ACL", "SETUSER", "default", "allchannels")
