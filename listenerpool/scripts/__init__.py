"""The pool's Lua scripts, read from this package once and called by SHA.

Each ``*.lua`` file documents its KEYS, ARGV and reply. redis-py's registered scripts send
EVALSHA and fall back to loading the script on NOSCRIPT (e.g. after a Redis restart), also inside
pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from redis.commands.core import AsyncScript

NAMES = ("claim", "adopt", "renew", "publish", "report", "release", "cancel", "reassert")


@cache
def source(name: str) -> str:
    """The text of one script (read once per process)."""
    return (files(__package__) / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    """The registered scripts of one Redis client."""

    claim: AsyncScript
    adopt: AsyncScript
    renew: AsyncScript
    publish: AsyncScript
    report: AsyncScript
    release: AsyncScript
    cancel: AsyncScript
    reassert: AsyncScript

    async def preload(self, redis: Any) -> None:
        """SCRIPT LOAD every script now, so calls start with a hit instead of a NOSCRIPT round
        trip (and so servers that mishandle NOSCRIPT, like fakeredis over TCP, never see one)."""
        for script in (self.claim, self.adopt, self.renew, self.publish, self.report,
                       self.release, self.cancel, self.reassert):  # fmt: skip
            await redis.script_load(script.script)

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        """Register every script on ``redis`` (an asyncio Redis client); no round trip is made."""
        return cls(**{name: redis.register_script(source(name)) for name in NAMES})
