"""The open files a worker's readers live within: each upstream listener holds one socket.

A process starts with the soft limit of open files (``ulimit -n``), often far below the hard
limit it may raise it to. A reader that cannot open its socket fails and retries forever, so
a worker takes no more sessions than it can open sockets for.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Files a worker holds besides its readers' sockets: its Redis connections (up to 64 for
# commands, 4 for leases, one subscription per node), its rq connection, its status server,
# the interpreter's own files; and a reader's next socket opens just before its old one closes.
RESERVED_FILES = 256


def raise_soft_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit, where the system lets
    it; returns the ``(soft, hard)`` limits in force (``resource.RLIM_INFINITY`` for none)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        # An unlimited hard limit is refused above the kernel's own cap (fs.nr_open).
        log.debug("open files: soft limit left at %d (raising it to %d: %s)", soft, hard, exc)
        return soft, hard
    return hard, hard


def capacity_within(capacity: int, open_files: int) -> int:
    """The sessions a worker may take when it may open ``open_files`` files: ``capacity``, or
    fewer when their sockets would not fit (at least one)."""
    if open_files == resource.RLIM_INFINITY:
        return capacity
    return max(1, min(capacity, open_files - RESERVED_FILES))


def fit_capacity(capacity: int) -> int:
    """Raise the soft limit, then the capacity the worker can honour; says so when that is
    less than ``capacity`` (``LP_WORKER_CAPACITY``)."""
    soft, hard = raise_soft_limit()
    fitted = capacity_within(capacity, soft)
    if fitted < capacity:
        log.warning(
            "LP_WORKER_CAPACITY=%d needs about %d open files, but this process may open %d "
            "(hard limit %s): taking at most %d sessions. Raise the hard limit to take more "
            "(ulimit -Hn in the starting shell, LimitNOFILE= for systemd, "
            "--ulimit nofile=N:N for Docker, ulimits: in docker-compose.yml)",
            capacity,
            capacity + RESERVED_FILES,
            soft,
            "none" if hard == resource.RLIM_INFINITY else hard,
            fitted,
        )
    return fitted
