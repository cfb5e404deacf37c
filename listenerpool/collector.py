"""Garbage-collector settings for a worker or gateway process.

A worker holds thousands of readers and a gateway thousands of client connections, all alive
whenever the collector runs, beside the objects of start-up (imports, the web app, settings)
that live as long as the process. With CPython's default thresholds (700, 10, 10) the young
generations are collected dozens of times a second, every pass walks those live objects, and a
pass of several milliseconds stalls every reader or client on the loop; a full pass walks the
start-up objects too (120-220 ms). The net growth of tracked objects comes from the reference
cycles the streams leave behind, so freezing start-up and a much larger first threshold make
collections rare (about one every 10 s at 1,000 sessions and 1,000 events/s) without letting
garbage grow unbounded. ``bench/README.md`` has the measurements.
"""

from __future__ import annotations

import gc

# Measured with bench/fanout.py shape b: GC CPU fell from 30-50 ms/s to 3-10 ms/s and
# collections from ~45 to ~1 per 10 s.
THRESHOLDS = (20_000, 20, 100)


def tune_collector() -> None:
    """Move everything allocated so far (imports, settings, clients) out of the collector's
    reach and raise the thresholds. Call once, after start-up and before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
