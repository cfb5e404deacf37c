"""Listen jobs from the rq queue ``lp-listen``, taken only while the worker has spare capacity.

rq carries dispatch, not execution: a job names (sid, token, epoch); the worker adopts the lease
and runs the reader on its own asyncio loop. No process is forked per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from rq import Queue
from rq.exceptions import DequeueTimeout, InvalidJobOperation
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import as_text, get_version

log = logging.getLogger(__name__)

DEQUEUE_BLOCK_SECONDS = 1
TAKE_BATCH = 100  # jobs per trip to the dequeue thread
SWEEP_SECONDS = 60.0  # bounds how long a stop request waits for the blocking read


def listen(sid: str, token: str, epoch: int) -> None:
    """The function listen jobs name. Jobs are consumed by ``python -m workers``, which reads
    their arguments; a plain ``rq worker`` executing one is a deployment mistake."""
    raise RuntimeError(
        f"listen job for session {sid!r} reached a plain rq worker; run `python -m workers`"
    )


@dataclass(frozen=True, slots=True)
class ListenJob:
    sid: str
    token: str
    epoch: int


def take_job(queue: Queue, *, block: bool = True) -> ListenJob | None:
    """Take one job (blocking up to a second when ``block``); remove it from rq's bookkeeping
    once read. Returns None when the queue is empty or the job was malformed."""
    try:
        found = Queue.dequeue_any(
            [queue],
            DEQUEUE_BLOCK_SECONDS if block else None,
            connection=queue.connection,
            serializer=JSONSerializer,
        )
    except DequeueTimeout:
        return None
    if found is None:
        return None
    job: Job = found[0]
    queue.intermediate_queue.remove(job.id)
    try:
        return _listen_job(job)
    finally:
        # It may have expired between the read and now; its arguments are already ours.
        with contextlib.suppress(InvalidJobOperation):
            job.delete()


def take_jobs(queue: Queue, limit: int) -> list[ListenJob]:
    """Wait up to a second for a first job, then take what else is queued, up to ``limit``."""
    first = take_job(queue)
    if first is None:
        return []
    return [first, *take_queued(queue, limit - 1)] if limit > 1 else [first]


def take_queued(queue: Queue, limit: int) -> list[ListenJob]:
    """Take up to ``limit`` queued jobs without blocking, in three pipelined round trips (pop
    the ids, fetch the jobs, forget them) instead of several per job: a ramp or a failover
    enqueues thousands at once, and one worker's dispatch thread must keep up with them."""
    if limit <= 0:
        return []
    connection = queue.connection
    moving = get_version(connection) >= (6, 2, 0)  # as rq: BLMOVE/LMOVE via its intermediate list
    intermediate = queue.intermediate_queue_key
    with connection.pipeline(transaction=False) as pipe:
        for _ in range(limit):
            if moving:
                pipe.lmove(queue.key, intermediate)
            else:
                pipe.lpop(queue.key)
        ids = [as_text(raw) for raw in pipe.execute() if raw is not None]
    if not ids:
        return []
    jobs: list[ListenJob] = []
    fetched = Job.fetch_many(ids, connection=connection, serializer=JSONSerializer)
    with connection.pipeline(transaction=False) as pipe:
        for job_id, job in zip(ids, fetched, strict=True):
            if moving:
                pipe.lrem(intermediate, 1, job_id)
            if job is None:  # expired between the enqueue and now
                continue
            parsed = _listen_job(job)
            if parsed is not None:
                jobs.append(parsed)
            # A listen job is never started and has no dependents: its hash is all there is
            # (rq's Job.delete would spend three round trips per job checking registries).
            pipe.delete(job.key)
        pipe.execute()
    return jobs


def _listen_job(job: Job) -> ListenJob | None:
    try:
        sid, token, epoch = job.args
        return ListenJob(str(sid), str(token), int(epoch))
    except (TypeError, ValueError):
        log.warning("dropping malformed listen job %s: args %r", job.id, job.args)
        return None


def sweep_intermediate(queue: Queue) -> int:
    """Drop ids left in rq's intermediate list by jobs that expired before anyone took them.

    rq moves a job id there before fetching the job; when the job has expired the id stays
    behind. Ids whose job still exists belong to a dequeue in progress and are left alone.
    Returns how many were removed.
    """
    intermediate = queue.intermediate_queue
    removed = 0
    for job_id in intermediate.get_job_ids():
        if not queue.connection.exists(Job.key_for(job_id)):
            intermediate.remove(job_id)
            removed += 1
    return removed


class JobFeed:
    """Pulls listen jobs and hands each batch taken to ``handle`` while ``spare_capacity()``
    is positive."""

    def __init__(
        self,
        queue: Queue,
        handle: Callable[[list[ListenJob]], Awaitable[None]],
        spare_capacity: Callable[[], int],
    ) -> None:
        self._queue = queue
        self._handle = handle
        self._spare_capacity = spare_capacity
        self._capacity_changed = asyncio.Event()
        self._stopping = asyncio.Event()

    def capacity_changed(self) -> None:
        self._capacity_changed.set()

    def stop(self) -> None:
        """Stop taking jobs; :meth:`run` returns within about a second."""
        self._stopping.set()
        self._capacity_changed.set()

    async def run(self, on_stop_job: Callable[[ListenJob], Awaitable[None]]) -> None:
        """Take jobs until stopped. A job read after the stop request, or beyond the spare
        capacity left when the read returns, goes to ``on_stop_job`` (the worker re-enqueues
        it), so none is lost to a shutdown race."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while not self._stopping.is_set():
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + SWEEP_SECONDS
                try:
                    await loop.run_in_executor(None, sweep_intermediate, self._queue)
                except Exception as exc:
                    log.warning("intermediate queue sweep failed: %s", exc)
            spare = self._spare_capacity()
            if spare <= 0:
                self._capacity_changed.clear()
                await self._capacity_changed.wait()
                continue
            try:
                # The read is shielded: a job the thread takes is always handled. A bare
                # executor future (not to_thread's task) keeps the loop's task list exact.
                limit = min(spare, TAKE_BATCH)
                jobs = await asyncio.shield(
                    loop.run_in_executor(None, take_jobs, self._queue, limit)
                )
            except Exception as exc:  # Redis down or a broken job: keep the feed alive
                log.warning("dequeue failed: %s: %s", type(exc).__name__, exc)
                await self._pause(1.0)
                continue
            if not jobs:
                continue
            # The room may have been taken while the read waited (the worker's reconciler
            # adopts what it re-claims): what no longer fits goes back for another worker.
            fits = 0 if self._stopping.is_set() else max(0, self._spare_capacity())
            if jobs[fits:]:
                await asyncio.gather(*(on_stop_job(job) for job in jobs[fits:]))
            if jobs[:fits]:
                await self._handle(jobs[:fits])

    async def _pause(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            pass


__all__ = [
    "JobFeed",
    "ListenJob",
    "listen",
    "sweep_intermediate",
    "take_job",
    "take_jobs",
    "take_queued",
]
