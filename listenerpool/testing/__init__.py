"""Test tools for listenerpool and its users: a scriptable SSE upstream, a fault-injecting TCP
proxy, throw-away redis-server processes, worker and gateway child processes, and the chaos
soak built on them (fleet, faults, following clients, history check)."""
