"""``python -m gateway``: the same as ``listenerpool gateway``."""

from __future__ import annotations

import sys

from listenerpool.cli import main

if __name__ == "__main__":
    sys.exit(main(["gateway", *sys.argv[1:]]))
