"""Many callers' single items through one batch call.

A gateway answering many single ``PUT``\\ s at once would otherwise pay three Redis round
trips and an rq enqueue per request; here the claims asked for while one batch is under way
wait for the next batch, which takes all of them: one round trip each for any number of
claims. A caller alone waits for nothing: its batch starts on the next pass of the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from functools import partial
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """``await submit(item)`` gives ``run(batch)``'s result for ``item``, where ``batch`` holds
    every item submitted while the previous batch ran (at most ``limit``, in the order they
    came). One batch runs at a time, on each event loop that submits. Items with the same
    ``key`` never share a batch: the later waits for the next, so they run in the order
    submitted. ``run`` returns one result per item, in order; an exception it raises is
    every item's.

    A caller cancelled while it waits leaves its item in the batch if that batch already
    started (the result is dropped), and out of it otherwise.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        key: Callable[[T], Hashable],
        limit: int,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._run = run
        self._key = key
        self._limit = limit
        #: Per event loop: the items waiting for a batch, and the task running batches.
        self._waiting: dict[asyncio.AbstractEventLoop, list[tuple[T, asyncio.Future[R]]]] = {}
        self._runner: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.setdefault(loop, []).append((item, future))
        runner = self._runner.get(loop)
        if runner is None or runner.done():
            runner = loop.create_task(self._batches(loop), name="coalesce")
            runner.add_done_callback(partial(self._ended, loop))
            self._runner[loop] = runner
        return await future

    def _ended(self, loop: asyncio.AbstractEventLoop, runner: asyncio.Task[None]) -> None:
        """A loop's batches ended. Cancelled (even before it began), nothing serves the items
        still waiting: their callers are cancelled too instead of waiting for ever."""
        if self._runner.get(loop) is not runner:
            return  # a newer task serves the loop
        del self._runner[loop]
        for _, future in self._waiting.pop(loop, []):
            future.cancel()

    async def _batches(self, loop: asyncio.AbstractEventLoop) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while batch := self._next_batch(loop):
                try:
                    results = await self._run([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"{len(results)} results for {len(batch)} items")
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise

    def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[tuple[T, asyncio.Future[R]]]:
        """Take the next batch off the loop's waiting items (a cancelled caller's is dropped)."""
        batch: list[tuple[T, asyncio.Future[R]]] = []
        later: list[tuple[T, asyncio.Future[R]]] = []
        keys: set[Hashable] = set()
        for item, future in self._waiting.get(loop, []):
            if future.done():
                continue
            key = self._key(item)
            if key in keys or len(batch) >= self._limit:
                later.append((item, future))
            else:
                keys.add(key)
                batch.append((item, future))
        self._waiting[loop] = later
        return batch
