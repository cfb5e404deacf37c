"""listenerpool's pytest plugin, loaded by pytest wherever listenerpool is installed (the
fixtures need the ``testing`` extras: ``pip install 'listenerpool[testing]'``).

Fixtures (all function-scoped, all prefixed ``lp_`` so they never clash with a suite's own):

- ``lp_pool``: a :class:`~listenerpool.testing.pool.LocalPool`, a gateway and one worker on one
  event loop on an in-process fakeredis; no Redis server needed. ``lp_pool.url`` is the gateway's
  base URL, ``lp_pool.client()`` a ``PoolClient`` for it, ``await lp_pool.wait_for_state(sid,
  "listening")`` and ``await lp_pool.wait_for_events(sid, n)`` wait with a deadline.
- ``lp_upstream``: an :class:`~listenerpool.testing.upstream.SSEUpstream` that sends only what
  the test scripts: ``lp_upstream.url(sid)`` to listen to, ``send(sid, data, event=, id=)``,
  ``close(sid)``, ``fail(sid, status)``, ``reset(sid)``, ``stats(sid)``.
- ``lp_settings``: a dict of settings for ``lp_pool`` (``{}``); override it in a conftest.py
  or a test module to change them, e.g. ``{"history_maxlen": 100}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from listenerpool.testing.pool import LocalPool
from listenerpool.testing.upstream import SSEUpstream

__all__ = ["lp_pool", "lp_settings", "lp_upstream"]


@pytest.fixture
def lp_settings() -> dict[str, Any]:
    """Settings (``Settings`` field names) that ``lp_pool`` starts with; override to change."""
    return {}


@pytest.fixture
def lp_pool(lp_settings: dict[str, Any]) -> Iterator[LocalPool]:
    """A running in-process pool on fakeredis, stopped (and its data gone) after the test."""
    with LocalPool(**lp_settings) as pool:
        yield pool


@pytest.fixture
def lp_upstream() -> Iterator[SSEUpstream]:
    """A scriptable SSE upstream on a free loopback port that sends only queued events
    (plus a heartbeat comment every second while idle)."""
    with SSEUpstream(total=0, heartbeat=1.0) as upstream:
        yield upstream
