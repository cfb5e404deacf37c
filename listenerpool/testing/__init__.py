"""Test tools for listenerpool and its users: a scriptable SSE upstream, a fault-injecting TCP
proxy and throw-away redis-server processes."""
