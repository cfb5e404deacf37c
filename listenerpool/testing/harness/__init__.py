"""The project's own test harness, not an API for users: worker and gateway child processes,
local Redis Cluster and Sentinel topologies, and the chaos soak (a fleet under random faults,
clients following sessions, a history check of every session). ``tests/`` and ``bench/`` use it;
what users import is one level up, in :mod:`listenerpool.testing`.
"""
