"""The pool's Lua scripts, read from this package once and called by SHA.

Each ``*.lua`` file documents its KEYS, ARGV and reply. Every call's KEYS lie in one hash slot
(one session's ``{sid}`` keys, or one index bucket's ``{ix.N}`` keys), so each runs on one
Redis Cluster shard as on a single server. redis-py's registered scripts send EVALSHA and fall
back to loading the script on NOSCRIPT (e.g. after a Redis restart); :func:`call_many` does the
same for pipelined calls on any client, a cluster's included. On a single server (or a
Sentinel's primary) :func:`call_many` sends up to ``BATCH_CALLS`` calls of a script as one run
of its batched form (``batch.lua`` around the script's text): a worker renewing, adopting or
publishing for many sessions packs one command and parses one reply per batch, not per session.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from functools import cache, partial
from importlib.resources import files
from typing import Any

from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    RedisError,
    TimeoutError,
    TryAgainError,
)

NAMES = (
    "claim",
    "adopt",
    "renew",
    "publish",
    "report",
    "release",
    "cancel",
    "reassert",
    "track",
    "due",
    "untrack",
)


# Calls per run of a batched script. One run holds the server for all of its calls, and its
# reply is parsed in one piece on the caller's loop: a renewal flush of 50 and its index writes
# hold the worker's loop under a millisecond (twice that as separate calls).
BATCH_CALLS = 50
_BODY_MARKER = "--@body\n"


@cache
def source(name: str) -> str:
    """The text of one script (read once per process)."""
    return (files(__package__) / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Batched:
    """The batched form of one script: ``batch.lua`` with the script's text as its body."""

    script: str
    sha: str


@cache
def batched(script: str) -> Batched:
    """The batched form of the script whose text is ``script``."""
    text = source("batch").replace(_BODY_MARKER, script.rstrip("\n") + "\n", 1)
    return Batched(text, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())


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
    track: AsyncScript
    due: AsyncScript
    untrack: AsyncScript

    async def preload(self, redis: Any) -> None:
        """SCRIPT LOAD every script now (on every primary of a cluster), so calls start with a
        hit instead of a NOSCRIPT round trip (and so servers that mishandle NOSCRIPT, like
        fakeredis over TCP, never see one)."""
        for field in fields(self):
            await _load(redis, getattr(self, field.name))

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        """Register every script on ``redis`` (an asyncio Redis client); no round trip is made."""
        return cls(**{name: redis.register_script(source(name)) for name in NAMES})


Call = tuple[Sequence[Any], Sequence[Any]]  # (keys, args) of one script call
# Told the calls (by position) whose final replies are in, as they come in.
Settled = Callable[[Sequence[int], Sequence[Any]], None]
# Sends commands (each its arguments) to a single server; their replies in order, an error
# reply as its exception instance.
Send = Callable[[list[list[Any]]], Awaitable[list[Any]]]


async def call_many(
    redis: Any,
    script: AsyncScript,
    calls: Sequence[Call],
    settled: Settled | None = None,
    *,
    send: Send | None = None,
) -> list[Any]:
    """Run ``script`` once per ``(keys, args)``, pipelined; the replies in order. Raises the
    first error a call met. ``settled``, if given, is told each reply (errors included) as
    soon as it is final, before the slowest node has answered.

    On a single server the calls go in runs of up to ``BATCH_CALLS`` of the script's batched
    form (one call alone as itself); each call still gets its own reply or error.

    A server that does not know the script (a replica promoted by a failover: Redis 7 does not
    replicate its script cache) refuses those calls with NOSCRIPT and runs nothing of them; the
    script is loaded and just those calls are sent again.

    On a cluster (whose pipelines refuse EVALSHA) the calls are grouped by the node serving
    their slot and each group is pipelined on one of that node's connections; a call the node
    redirects (a slot in migration or just moved) or that meets a connection error is sent
    again on its own through the cluster client, which follows redirections and failovers.
    Those are sent concurrently: one after the other, a shard's hundred calls waiting out its
    failover in turn would hold up the whole round.

    ``send``, on a single server, carries the runs instead of a pipeline of ``redis`` (a
    connection of the caller's own, such as the worker's publisher keeps); scripts
    are still loaded through ``redis``.
    """
    if not calls:
        return []
    run: Callable[[Any, AsyncScript, Sequence[Call], Settled], Awaitable[list[Any]]]
    if isinstance(redis, RedisCluster):
        run = _on_cluster
    else:
        run = partial(_in_runs, send if send is not None else _pipeline_of(redis))

    def final(positions: Sequence[int], replies: Sequence[Any]) -> None:
        # NOSCRIPT is not final: those calls are sent again below.
        done = [(p, r) for p, r in zip(positions, replies, strict=True)
                if not isinstance(r, NoScriptError)]  # fmt: skip
        if settled is not None and done:
            settled([p for p, _ in done], [r for _, r in done])

    replies = await run(redis, script, calls, final)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        await _load(redis, script)

        def final_again(positions: Sequence[int], again: Sequence[Any]) -> None:
            final([missing[p] for p in positions], again)

        again = await run(redis, script, [calls[i] for i in missing], final_again)
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def _load(redis: Any, script: AsyncScript) -> None:
    """Load ``script`` and, on a single server, its batched form: the forms call_many sends."""
    await redis.script_load(script.script)
    if not isinstance(redis, RedisCluster):
        await redis.script_load(batched(script.script).script)


async def _in_runs(
    send: Send, redis: Any, script: AsyncScript, calls: Sequence[Call], settled: Settled
) -> list[Any]:
    runs = [range(start, min(start + BATCH_CALLS, len(calls)))
            for start in range(0, len(calls), BATCH_CALLS)]  # fmt: skip
    commands: list[list[Any]] = []
    for positions in runs:
        # EVALSHA itself, not the registered script: a pipeline that runs a registered
        # script first asks the server whether it has it (SCRIPT EXISTS), a round trip of
        # its own per pipeline. A server without it answers NOSCRIPT, handled above.
        if len(positions) == 1:
            keys, args = calls[positions[0]]
            commands.append(["EVALSHA", script.sha, len(keys), *keys, *args])
        else:
            commands.append(["EVALSHA", *_batched_call(script, calls, positions)])
    run_replies = await send(commands)
    replies: list[Any] = []
    for positions, reply in zip(runs, run_replies, strict=True):
        if len(positions) == 1 or isinstance(reply, Exception):
            replies += [reply] * len(positions)  # a run refused whole fails each of its calls
        else:
            replies += reply
    settled(range(len(replies)), replies)
    return replies


def _pipeline_of(redis: Any) -> Send:
    """Sends commands in one redis-py pipeline of ``redis``."""

    async def send(commands: list[list[Any]]) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))

    return send


def _batched_call(script: AsyncScript, calls: Sequence[Call], positions: range) -> list[Any]:
    """The arguments of EVALSHA that run the ``calls`` at ``positions`` in one batched run."""
    keys: list[Any] = []
    counts: list[int] = [len(positions)]
    args: list[Any] = []
    for position in positions:
        call_keys, call_args = calls[position]
        keys += call_keys
        args += call_args
        counts += (len(call_keys), len(call_args))
    return [batched(script.script).sha, len(keys), *keys, *counts, *args]


async def _on_cluster(
    redis: RedisCluster, script: AsyncScript, calls: Sequence[Call], settled: Settled
) -> list[Any]:
    await redis.initialize()
    groups: dict[str, tuple[Any, list[PipelineCommand]]] = {}
    for position, (keys, args) in enumerate(calls):
        node = redis.get_node_from_key(keys[0])
        assert node is not None, "initialized: every slot has a primary"
        command = PipelineCommand(position, "EVALSHA", script.sha, len(keys), *keys, *args)
        groups.setdefault(node.name, (node, []))[1].append(command)
    replies: list[Any] = [None] * len(calls)
    retry: list[int] = []

    async def run(node: Any, commands: list[PipelineCommand]) -> None:
        try:
            await node.execute_pipeline(commands)
        except (RedisError, OSError) as exc:
            for command in commands:
                command.result = exc
        done = []
        for command in commands:
            if isinstance(command.result, _SEND_AGAIN):
                retry.append(command.position)
            else:
                done.append(command.position)
            replies[command.position] = command.result
        settled(done, [replies[p] for p in done])

    async def again(position: int) -> None:
        keys, args = calls[position]
        try:
            replies[position] = await redis.evalsha(script.sha, len(keys), *keys, *args)
        except RedisError as exc:
            replies[position] = exc
        settled([position], [replies[position]])

    await asyncio.gather(*(run(node, commands) for node, commands in groups.values()))
    await asyncio.gather(*(again(position) for position in sorted(retry)))
    return replies


# A redirection, or a node that could not be reached: the cluster client sends it again where
# the slot is now. (Errors raised by the script itself would only repeat.)
_SEND_AGAIN = (AskError, TryAgainError, ClusterDownError, ConnectionError, TimeoutError, OSError)


__all__ = [
    "BATCH_CALLS",
    "NAMES",
    "Batched",
    "Call",
    "Scripts",
    "Send",
    "Settled",
    "batched",
    "call_many",
    "source",
]
