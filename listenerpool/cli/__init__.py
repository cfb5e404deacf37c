"""The processes: the ``listenerpool`` command (:mod:`.commands`), the servers it runs in one
process (:mod:`.launch`: gateway, worker, both, the demo), the embedded single-node Redis
(:mod:`.embedded`) and the AG-UI-style demo upstream (:mod:`.demo_upstream`).

This layer sits above ``gateway/`` and ``workers/`` (it starts them); the core never imports it.
"""

from listenerpool.cli.commands import main

__all__ = ["main"]
