"""A changed spec reaches its reader even when the 'reconnect' notice is lost.

The notice goes over pub/sub, which is at most once: a worker whose control subscription is
down when the PUT lands never sees it. The renewal is the backstop: the PUT bumps the spec's
revision, and the holder's next renewal reports it (see renew.lua)."""

from __future__ import annotations

import pytest

from listenerpool.keys import SessionKeys
from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.tcpproxy import TCPProxy
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import Pool, eventually, running_worker
from tests.workers.test_reader_faults import wait_events, wait_state

pytestmark = pytest.mark.timeout(60)

# Deadlines a loaded machine meets: the backstop acts at the next renewal (every
# renew_interval); several lease TTLs leave room for slow rounds and the reconnect.
LEASE_TTLS = 5


async def assert_moved(pool: Pool, upstream: SSEUpstream, sid: str, old: str, new: str) -> None:
    deadline = LEASE_TTLS * pool.settings.lease_ttl + pool.settings.renew_interval
    await eventually(lambda: upstream.stats(new).connections_total >= 1, deadline,
                     f"{sid}: the reader never connected to the new URL")  # fmt: skip
    await eventually(lambda: upstream.stats(old).concurrent == 0, deadline,
                     f"{sid}: the connection to the old URL is still open")  # fmt: skip
    state = await wait_state(pool, sid, "listening")
    assert state["epoch"] == "1", "the same lease carries on: only the spec changed"
    status = await pool.control.status(sid)
    assert status is not None and status.url == upstream.url(new)


async def test_a_changed_spec_whose_notice_was_never_sent_reaches_the_reader(
    pool: Pool, upstream: SSEUpstream
) -> None:
    async with running_worker(pool):
        await pool.control.claim("quiet", upstream.url("quiet-old"))
        await wait_events(pool, "quiet", 3)
        k = SessionKeys("quiet")
        # The claim script alone: the spec changes, no notice is published on lp:ctl.
        [outcome, *_] = await pool.control.scripts.claim(
            keys=[k.spec, k.lease, k.cancel, k.state],
            args=["put", "0" * 16, 5000, upstream.url("quiet-new"), "{}"],
        )
        assert outcome in (b"updated", "updated")
        await assert_moved(pool, upstream, "quiet", "quiet-old", "quiet-new")


async def test_a_reconnect_notice_lost_to_a_cut_control_channel_is_caught_by_the_renewal(
    redis_server: RedisServer, upstream: SSEUpstream
) -> None:
    with TCPProxy(redis_server.port) as proxy:
        through_proxy = Pool(f"redis://127.0.0.1:{proxy.port}/0")
        direct = Pool(redis_server.url)
        try:
            async with running_worker(through_proxy):
                for n in range(3):
                    await direct.control.claim(f"cut{n}", upstream.url(f"cut{n}-old"))
                for n in range(3):
                    await wait_events(direct, f"cut{n}", 3)
                # Every connection of the worker, its control subscription included, is closed
                # and cannot reconnect while the PUTs land: their notices reach nobody.
                proxy.set_mode("cut")
                try:
                    for n in range(3):
                        result = await direct.control.claim(f"cut{n}", upstream.url(f"cut{n}-new"))
                        assert result.outcome.value == "updated"
                finally:
                    proxy.set_mode("pass")
                for n in range(3):
                    await assert_moved(direct, upstream, f"cut{n}", f"cut{n}-old", f"cut{n}-new")
        finally:
            await through_proxy.aclose()
            await direct.aclose()
