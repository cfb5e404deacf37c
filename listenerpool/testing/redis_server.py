"""Throw-away ``redis-server`` processes on free loopback ports, for tests that kill, restart and
pause Redis without disturbing anything else on the machine (the pool's own child-process
class, see :mod:`listenerpool.redis_process`)."""

from listenerpool.redis_process import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]
