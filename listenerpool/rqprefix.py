"""rq's key prefix, set before rq is first imported.

rq reads ``RQ_KEY_PREFIX`` once, at import. The pool's default ``{rq}`` is a Redis Cluster hash
tag: all of rq's keys (queue, jobs, registries) then live in one hash slot, so rq's
transactions and ``BLMOVE`` work on a cluster exactly as on one server. An ``RQ_KEY_PREFIX``
already in the environment wins. Every package of the pool imports this module first.
"""

from __future__ import annotations

import os

from listenerpool.keys import RQ_KEY_PREFIX

os.environ.setdefault("RQ_KEY_PREFIX", RQ_KEY_PREFIX)
