"""``python -m workers``: the same as ``listenerpool worker``."""

from __future__ import annotations

import sys

from listenerpool.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
