"""Test tools for listenerpool and its users: an in-process pool on fakeredis, a scriptable SSE
upstream, a fault-injecting TCP proxy and throw-away redis-server processes.

The pytest plugin (:mod:`listenerpool.testing.plugin`, registered as a ``pytest11`` entry point)
turns the first two into the fixtures ``lp_pool`` and ``lp_upstream``.
"""
