"""listenerpool's test kit for a backend's own tests (``pip install 'listenerpool[testing]'``).

- :class:`LocalPool`: a gateway and one worker in a thread, on an in-process fakeredis.
- :class:`SSEUpstream`: an SSE upstream on a free loopback port that sends what a test scripts.
- :class:`TCPProxy`: a TCP proxy whose link a test can pass, stall or cut (:data:`Mode`).
- :class:`RedisServer`: a throw-away ``redis-server`` child on a free port (:func:`free_port`).
- :func:`wait_until` / :func:`await_until`: poll a condition with a deadline, no sleeps.

The pytest plugin (:mod:`listenerpool.testing.plugin`, registered as a ``pytest11`` entry
point) turns the first two into the fixtures ``lp_pool`` and ``lp_upstream``.
:mod:`listenerpool.testing.harness` is the project's own multi-process and chaos harness.
"""

from listenerpool.testing.loopthread import await_until, wait_until
from listenerpool.testing.pool import LocalPool
from listenerpool.testing.redis_server import RedisServer, free_port
from listenerpool.testing.tcpproxy import Mode, TCPProxy
from listenerpool.testing.upstream import ConnectionRecord, SSEUpstream, UpstreamStats

__all__ = [
    "ConnectionRecord",
    "LocalPool",
    "Mode",
    "RedisServer",
    "SSEUpstream",
    "TCPProxy",
    "UpstreamStats",
    "await_until",
    "free_port",
    "wait_until",
]
