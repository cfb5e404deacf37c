"""The soak's fault injection against a real topology: a fault does what it names, and no more."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from listenerpool.testing.harness.faults import POOL_CHANNELS
from listenerpool.testing.harness.redis_cluster import HOST, wait_for
from listenerpool.testing.harness.redis_sentinel import MASTER, RedisSentinels

SENTINELS = 3


@pytest.fixture
def sentinels() -> Iterator[RedisSentinels]:
    with RedisSentinels(sentinels=SENTINELS) as group:
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


PAUSE_S = 1.5  # longer than a loaded host delayed a primary's replies in a soak run


@pytest.mark.timeout(60)
def test_a_primary_silent_for_a_loaded_moment_is_not_failed_over(
    sentinels: RedisSentinels,
) -> None:
    """On a loaded 2-core host a primary's replies came more than a second late, just after
    its promotion: Sentinels that then count it as down fail over a primary that is alive, and
    it keeps taking writes on the connections it has until they turn it into a replica (two
    primaries for seconds: two workers each holding the same leases)."""
    primary = sentinels.primary_port()
    watchers = [redis.Redis(HOST, port, socket_timeout=2.0) for port in sentinels.sentinel_ports]
    events = [watcher.pubsub() for watcher in watchers]
    try:
        for channel in events:
            channel.subscribe("+sdown")
            assert channel.get_message(timeout=2.0) is not None, "not subscribed"
        server = sentinels.server_on(primary)
        server.pause()
        try:
            # Held until every Sentinel has gone PAUSE_S without a reply from the primary.
            wait_for(
                lambda: all(
                    int(w.sentinel_master(MASTER)["last-ok-ping-reply"]) >= PAUSE_S * 1000
                    for w in watchers
                ),
                10,
                f"every Sentinel {PAUSE_S} s without a reply from the primary",
            )
        finally:
            server.resume()
        resumed = time.monotonic()

        def pinged_since_resumed() -> bool:
            since_ms = (time.monotonic() - resumed) * 1000
            return all(
                int(w.sentinel_master(MASTER)["last-ok-ping-reply"]) < since_ms for w in watchers
            )

        wait_for(pinged_since_resumed, 10, "every Sentinel answered by the primary again")
        downs = [m["data"] for channel in events for m in iter(channel.get_message, None)]
        assert downs == [], f"the Sentinels counted the primary as down: {downs}"
        assert sentinels.primary_port() == primary
    finally:
        for channel, watcher in zip(events, watchers, strict=True):
            channel.close()
            watcher.close()
