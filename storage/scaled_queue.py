"""The scaled queue: generation rows carried by procrastinate jobs on PostgreSQL.

The row stays the record (status, timings, images); each queued row has one
procrastinate job in the queue of its base model, so a worker never swaps
models. procrastinate does the distributed part: ``FOR UPDATE SKIP LOCKED``
fetches, LISTEN/NOTIFY wake-ups, worker heartbeats and stalled-job detection.

Fairness is expressed in procrastinate's own terms:

* **priority** is ``-TURN * (k - 1) - served``: the k-th waiting job of a user
  is in turn k, and within a turn users who were served less come first
  (``served``: the user's jobs started so far, at most ``TURN - 1``). When a
  job of theirs starts, their other waiting jobs move up a turn and take one
  more "served" (:func:`advance_turns`: ``+TURN - 1``). Ties go to the
  earliest job. A user who queues ten jobs and another who then queues one:
  the second user's job runs second.
* **lock** ``imagine-user:<id>:<slot>`` with ``slot`` cycling below the user's
  running limit: procrastinate never runs two jobs with one lock at once.

Submission writes the row, then defers the job (two connections, so not one
transaction); :meth:`ProcrastinateQueue.reconcile` gives every queued row
without a live job a new one, and runs at every worker's start and then
periodically. :class:`ProcrastinateJobs` is the worker's side: procrastinate
hands it the jobs of its model's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from storage.database import Database, is_outage
from storage.errors import IllegalTransition, QueueUnavailable
from storage.events import EventBus
from storage.generations import get_generation, transition
from storage.models import Generation, GenerationStatus, Guild
from storage.queue import (
    Cancellations,
    RunJob,
    Submission,
    record_cancel,
    record_submission,
)
from storage.scheduling import (
    Limits,
    QueuePosition,
    estimated_wait,
    live_workers,
    recent_job_seconds,
)

if TYPE_CHECKING:
    from procrastinate import App

log = logging.getLogger(__name__)

S = GenerationStatus
TASK = "imagine.run_generation"
TURN = 1000  # priority distance between two turns


def queue_name(model: str) -> str:
    """procrastinate queue of a base model: readable, unique, short."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40] or "model"
    return f"imagine.{slug}.{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def make_app(url: URL) -> App:
    """A procrastinate App on the database at ``url`` (psycopg connector)."""
    import procrastinate

    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))


async def advance_turns(session: AsyncSession, queue: str, requester_id: int) -> None:
    """A job of this user started: their other waiting jobs move up one turn."""
    await session.execute(
        text(
            f"UPDATE procrastinate_jobs SET priority = priority + {TURN - 1} "
            "WHERE queue_name = :queue AND status = 'todo' AND lock LIKE :lock"
        ),
        {"queue": queue, "lock": f"imagine-user:{requester_id}:%"},
    )


class ProcrastinateQueue:
    """Rows in PostgreSQL, jobs in procrastinate; workers may be anywhere.

    ``app`` is a procrastinate App (:func:`make_app`) that the caller keeps open."""

    def __init__(
        self,
        database: Database,
        limits: Limits,
        app: App,
        events: EventBus,
        cancellations: Cancellations,
        stale_seconds: float = 30.0,
    ) -> None:
        self.database = database
        self.limits = limits
        self.app = app
        self.events = events
        self.cancellations = cancellations
        self.stale_seconds = stale_seconds

    async def submit(self, submission: Submission) -> Generation:
        try:
            generation = await record_submission(self.database, self.limits, submission)
        except Exception as exc:
            if is_outage(exc):
                raise QueueUnavailable() from exc
            raise
        try:
            await self.defer(generation.id)
            async with self.database.session() as session:
                return await get_generation(session, generation.id)
        except Exception as exc:
            if not is_outage(exc):
                raise
            # The row is recorded: a worker's reconcile gives it its job once the database is back.
            log.warning("generation %s is queued without its job yet (%s)", generation.id, exc)
            return generation

    async def defer(self, generation_id: int) -> int | None:
        """Give a queued row its job; ``None`` if the row is no longer queued."""
        async with self.database.session() as session:
            generation = await get_generation(session, generation_id)
            if generation.status is not S.QUEUED:
                return None
            queue = queue_name(generation.model)
            ahead = await session.scalar(
                text(
                    "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = :queue "
                    "AND status = 'todo' AND lock LIKE :lock"
                ),
                {"queue": queue, "lock": f"imagine-user:{generation.requester_id}:%"},
            )
            running_limit = self.limits.max_running_per_user
            if generation.guild_id is not None:
                guild = await session.get(Guild, generation.guild_id)
                if guild is not None and guild.max_running_per_user:
                    running_limit = guild.max_running_per_user
            jobs_so_far = await session.scalar(
                select(func.count())
                .select_from(Generation)
                .where(Generation.requester_id == generation.requester_id)
            )
            served = await session.scalar(
                select(func.count())
                .select_from(Generation)
                .where(
                    Generation.requester_id == generation.requester_id,
                    Generation.model == generation.model,
                    Generation.started_at.is_not(None),
                )
            )
        slot = (jobs_so_far or 0) % max(1, running_limit)
        from procrastinate.exceptions import AlreadyEnqueued

        try:
            job_id: int = await self.app.configure_task(
                TASK,
                queue=queue,
                priority=-TURN * int(ahead or 0) - min(int(served or 0), TURN - 1),
                lock=f"imagine-user:{generation.requester_id}:{slot}",
                # One waiting job per row, even when two workers reconcile at once.
                queueing_lock=f"imagine-generation:{generation_id}",
            ).defer_async(generation_id=generation_id)
        except AlreadyEnqueued:
            return None
        async with self.database.session() as session:
            row = await session.get_one(Generation, generation_id)
            row.job_id = job_id
        return job_id

    async def cancel(self, generation_id: int) -> Generation:
        generation = await record_cancel(
            self.database, self.events, self.cancellations, generation_id
        )
        if generation.status is S.CANCELLED and generation.job_id is not None:
            await self.app.job_manager.cancel_job_by_id_async(generation.job_id)
        return generation

    async def position(self, generation_id: int) -> QueuePosition:
        async with self.database.session() as session:
            generation = await get_generation(session, generation_id)
            if generation.status is not S.QUEUED or generation.job_id is None:
                return QueuePosition(generation_id, generation.status, 0, 0.0)
            ahead = await session.scalar(
                text(
                    "SELECT count(*) FROM procrastinate_jobs j, procrastinate_jobs me "
                    "WHERE me.id = :job AND j.queue_name = me.queue_name "
                    "AND j.status = 'todo' AND (j.priority > me.priority "
                    "OR (j.priority = me.priority AND j.id < me.id))"
                ),
                {"job": generation.job_id},
            )
            running = await session.scalar(
                text(
                    "SELECT count(*) FROM procrastinate_jobs j, procrastinate_jobs me "
                    "WHERE me.id = :job AND j.queue_name = me.queue_name AND j.status = 'doing'"
                ),
                {"job": generation.job_id},
            )
            seconds = await recent_job_seconds(session)
            workers = await live_workers(
                session, generation.model, timedelta(seconds=self.stale_seconds)
            )
        position = int(ahead or 0) + 1
        wait = estimated_wait(position, seconds, workers, bool(running))
        return QueuePosition(generation_id, S.QUEUED, position, wait, workers)

    async def reconcile(self, model: str | None = None) -> list[int]:
        """Defer a job for every queued row whose job is missing, finished or cancelled."""
        query = text(
            "SELECT g.id FROM generations g LEFT JOIN procrastinate_jobs j ON j.id = g.job_id "
            "WHERE g.status = 'queued' AND (j.id IS NULL OR j.status NOT IN ('todo', 'doing'))"
            + (" AND g.model = :model" if model is not None else "")
            + " ORDER BY g.id"
        )
        async with self.database.session() as session:
            orphans = list(await session.scalars(query, {"model": model}))
        for generation_id in orphans:
            await self.defer(generation_id)
        return orphans

    async def retry_stalled(self, model: str, stale_seconds: float) -> int:
        """Jobs of workers that stopped beating go back to ``todo`` for another worker."""
        stalled = await self.app.job_manager.get_stalled_jobs(
            queue=queue_name(model), seconds_since_heartbeat=stale_seconds
        )
        from procrastinate.exceptions import UniqueViolation
        from procrastinate.jobs import Status

        for job in stalled:
            try:
                await self.app.job_manager.retry_job(job)
            except UniqueViolation:  # the row was given a new job meanwhile (reconcile)
                await self.app.job_manager.finish_job(job, Status.FAILED, delete_job=False)
        return len(list(stalled))


class ProcrastinateJobs:
    """A worker's jobs from procrastinate: the queue of its model, one job at a time.

    ``queue`` is the :class:`ProcrastinateQueue` whose open app this uses (to register
    the task, run procrastinate's worker, reconcile and retry stalled jobs)."""

    def __init__(
        self,
        queue: ProcrastinateQueue,
        heartbeat_seconds: float = 5.0,
    ) -> None:
        self.queue = queue
        self.heartbeat_seconds = heartbeat_seconds

    async def prepare(self, model: str) -> None:
        requeued = await self.queue.reconcile(model)
        if requeued:
            log.warning("gave %d queued generation(s) a new job: %s", len(requeued), requeued)

    async def sweep(self, model: str, stale_seconds: float) -> None:
        if await self.queue.retry_stalled(model, stale_seconds):
            log.warning("retried the jobs of a worker that stopped beating")
        await self.queue.reconcile(model)

    async def serve(self, model: str, worker_name: str, run: RunJob, stop: asyncio.Event) -> None:
        name = queue_name(model)
        database = self.queue.database

        async def run_generation(generation_id: int) -> None:
            try:
                async with database.session() as session:
                    generation = await transition(
                        session, generation_id, S.RUNNING, worker_name=worker_name
                    )
                    await advance_turns(session, name, generation.requester_id)
            except IllegalTransition:
                log.info("generation %s is no longer queued; nothing to run", generation_id)
                return
            await run([generation])  # procrastinate hands out one job at a time: no batches

        self.queue.app.task(name=TASK, pass_context=False)(run_generation)
        while not stop.is_set():
            try:
                await self._run_procrastinate(name, worker_name, stop)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.warning("the queue's database is unavailable (%s)", exc)
            if stop.is_set():
                break
            # procrastinate's worker stops when it loses the database (its listener or its
            # heartbeat fails); the job in hand has finished. Start a new one once it is back.
            await asyncio.sleep(1)
            await self.queue.database.wait_until_back()
            log.warning("the database is back; %s fetches jobs again", worker_name)

    async def _run_procrastinate(self, queue: str, worker_name: str, stop: asyncio.Event) -> None:
        """procrastinate's worker on ``queue``, until ``stop`` is set or it stops by itself."""
        running = asyncio.create_task(
            self.queue.app.run_worker_async(
                queues=[queue],
                concurrency=1,
                name=worker_name,
                wait=True,
                install_signal_handlers=False,
                update_heartbeat_interval=self.heartbeat_seconds,
                stalled_worker_timeout=self.queue.stale_seconds,
            )
        )
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not running.done():
                running.cancel()  # procrastinate stops fetching and lets the job in hand finish
            await asyncio.gather(stopping, return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await running
