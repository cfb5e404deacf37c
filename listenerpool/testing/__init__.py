"""Test tools for listenerpool and its users: an in-process pool on fakeredis, a scriptable SSE
upstream, a fault-injecting TCP proxy, throw-away redis-server processes, worker and gateway
child processes, and the chaos soak built on them (fleet, faults, following clients, history
check).

The pytest plugin (:mod:`listenerpool.testing.plugin`, registered as a ``pytest11`` entry point)
turns the first two into the fixtures ``lp_pool`` and ``lp_upstream``.
"""
