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

**Batches** (``IMAGINE_MAX_BATCH``): with the job procrastinate handed it, a worker takes
the jobs procrastinate would hand out next, one after another, while they share the
first one's :func:`~storage.scheduling.batch_key` and their images fit. Each is taken as
procrastinate's fetch takes a job (``FOR UPDATE SKIP LOCKED``, status ``doing`` under the
worker's id), so stalled-job recovery treats it like any other, and finished on its own.
The first job that does not fit ends the batch, and so does one whose lock a job of the
batch holds (procrastinate would not hand it out before that job ends): a batch never lets
a job overtake one it would not have overtaken. A lock allows one running job, so a
user's jobs under one lock never share a batch (with ``IMAGINE_MAX_RUNNING_PER_USER=1``
a user's jobs never do; other users' jobs join theirs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import select as select_module
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Integer,
    Select,
    String,
    Table,
    bindparam,
    column,
    func,
    literal,
    literal_column,
    select,
    table,
    text,
    update,
)
from sqlalchemy import cast as cast_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from storage.database import Database, is_outage
from storage.errors import IllegalTransition, NotFound, QueueUnavailable
from storage.events import EventBus
from storage.generations import (
    check_id,
    get_generation,
    returned_rows,
    transition_in_one_statement,
    transition_statement,
)
from storage.models import (
    Generation,
    GenerationStatus,
    Guild,
    Image,
    utcnow,
)
from storage.queue import (
    Cancellations,
    RunJob,
    Submission,
    record_cancel,
    record_submission,
)
from storage.scheduling import (
    DEFAULT_JOB_SECONDS,
    RECENT_JOBS,
    Limits,
    QueuePosition,
    batch_key,
    estimated_wait,
    ran_before,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool
    from procrastinate import App, JobContext

log = logging.getLogger(__name__)

S = GenerationStatus
TASK = "imagine.run_generation"
TURN = 1000  # priority distance between two turns


# A generation's place: jobs ahead of its job in its queue, jobs running there, the average
# of the last finished jobs' durations and the live workers for its model.
_POSITION = text(
    """
    SELECT g.status, g.job_id,
        (SELECT count(*) FROM procrastinate_jobs j, procrastinate_jobs me
         WHERE me.id = g.job_id AND j.queue_name = me.queue_name AND j.status = 'todo'
         AND (j.priority > me.priority OR (j.priority = me.priority AND j.id < me.id))) AS ahead,
        (SELECT count(*) FROM procrastinate_jobs j, procrastinate_jobs me
         WHERE me.id = g.job_id AND j.queue_name = me.queue_name AND j.status = 'doing')
         AS running,
        (SELECT avg(EXTRACT(EPOCH FROM r.finished_at - r.started_at)) FROM
            (SELECT started_at, finished_at FROM generations
             WHERE status = 'succeeded' AND started_at IS NOT NULL
             ORDER BY finished_at DESC LIMIT :recent) r) AS seconds,
        (SELECT count(*) FROM workers w WHERE w.model = g.model
         AND w.heartbeat_at >= now() - make_interval(secs => :stale)) AS workers
    FROM generations g WHERE g.id = :id
    """
)


def queue_name(model: str) -> str:
    """procrastinate queue of a base model: readable, unique, short."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40] or "model"
    return f"imagine.{slug}.{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def make_app(url: URL) -> App:
    """A procrastinate App on the database at ``url`` (psycopg connector)."""
    import procrastinate

    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    # Each of procrastinate's queries is one statement (a function call), atomic by itself:
    # in autocommit it is one round trip, not a BEGIN, the query and a COMMIT.
    return procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=conninfo, configure=_autocommit, pool_factory=_pool
        )
    )


async def _autocommit(connection: psycopg.AsyncConnection[Any]) -> None:
    await connection.set_autocommit(True)


def _pool(**kwargs: Any) -> psycopg_pool.AsyncConnectionPool[Any]:
    """procrastinate's pool, checking a connection only when it may have been closed."""
    import psycopg_pool

    return psycopg_pool.AsyncConnectionPool(**{**kwargs, "check": _check_if_stirred})


async def _check_if_stirred(connection: psycopg.AsyncConnection[Any]) -> None:
    # procrastinate's check is an empty query before each of its own: a round trip, as much
    # as the query. A server that ended an idle connection (a restart, a shutdown) has sent
    # its goodbye or closed the socket, so there is something to read: only then is it
    # checked (and replaced if it fails), as storage.database does for asyncpg.
    if connection.closed or connection.broken:
        import psycopg

        raise psycopg.OperationalError("the connection is closed")
    idle = select_module.poll()
    idle.register(connection.fileno(), select_module.POLLIN)
    if idle.poll(0):
        await connection.execute("")


_JOBS = table(
    "procrastinate_jobs",
    column("queue_name"),
    column("status"),
    column("lock"),
    column("priority", Integer),
)


@functools.cache
def _start_statement() -> Select[Any]:
    """:func:`start_job` in one statement: the row goes ``running`` (as
    :func:`~storage.generations.transition` moves it), that user's waiting jobs move up a
    turn (:func:`advance_turns`, only if the row moved), and the row comes back with its
    images and styles."""
    generations = cast(Table, Generation.__table__)
    claimed = (
        transition_statement(S.RUNNING, ("generation_id", "now", "worker_name"))
        .returning(*generations.c)
        .cte("claimed")
    )
    turned = (
        update(_JOBS)
        .where(
            _JOBS.c.queue_name == bindparam("queue", type_=String),
            _JOBS.c.status == literal_column("'todo'"),
            _JOBS.c.lock.like(
                literal("imagine-user:") + cast_(claimed.c.requester_id, String) + ":%"
            ),
        )
        .values(priority=_JOBS.c.priority + (TURN - 1))
        .cte("turned")
    )
    return returned_rows(claimed, cast(Table, Image.__table__), turned)


async def start_job(
    database: Database, generation_id: int, worker_name: str, queue: str
) -> Generation:
    """Move a queued generation to ``running`` on ``worker_name`` and advance its user's
    turns in ``queue``, in one round trip; :class:`IllegalTransition` if it is not queued."""
    return await transition_in_one_statement(
        database,
        _start_statement(),
        {
            "generation_id": generation_id,
            "now": utcnow(),
            "worker_name": worker_name,
            "queue": queue,
        },
        S.RUNNING,
    )


async def advance_turns(session: AsyncSession, queue: str, requester_id: int) -> None:
    """A job of this user started: their other waiting jobs move up one turn."""
    await session.execute(
        text(
            f"UPDATE procrastinate_jobs SET priority = priority + {TURN - 1} "
            "WHERE queue_name = :queue AND status = 'todo' AND lock LIKE :lock"
        ),
        {"queue": queue, "lock": f"imagine-user:{requester_id}:%"},
    )


async def give_back_turn(session: AsyncSession, job_id: int, requester_id: int) -> None:
    """Waiting job ``job_id`` was cancelled: this user's jobs queued after it move up the
    turn it held, as if it had never been queued (their priorities counted it)."""
    await session.execute(
        text(
            f"UPDATE procrastinate_jobs AS later SET priority = later.priority + {TURN} "
            "FROM procrastinate_jobs AS gone WHERE gone.id = :job "
            "AND later.queue_name = gone.queue_name AND later.status = 'todo' "
            "AND later.lock LIKE :lock AND later.priority < gone.priority"
        ),
        {"job": job_id, "lock": f"imagine-user:{requester_id}:%"},
    )


# procrastinate's choice of the next job in a queue (procrastinate_fetch_job_v2's candidate:
# waiting, due, its lock neither running nor owed to an earlier job), except that a lock
# held by a job of the worker's batch (:taken) does not hide a job: that job ends the batch.
_NEXT_JOB = """
    FROM procrastinate_jobs AS jobs
    WHERE jobs.status = 'todo' AND jobs.queue_name = :queue
    AND (jobs.scheduled_at IS NULL OR jobs.scheduled_at <= now())
    AND NOT EXISTS (
        SELECT 1 FROM procrastinate_jobs AS other_jobs
        WHERE jobs.lock IS NOT NULL AND other_jobs.lock = jobs.lock
        AND ((other_jobs.status = 'doing' AND other_jobs.id <> ALL(:taken))
            OR (other_jobs.status = 'todo' AND (other_jobs.priority > jobs.priority
                OR (other_jobs.priority = jobs.priority AND other_jobs.id < jobs.id)))))
    ORDER BY jobs.priority DESC, jobs.id ASC LIMIT 1
"""

_generations = cast(Table, Generation.__table__)
_NEXT_IN_QUEUE = (
    text(
        "SELECT next.job_id, next.lock_held, g.id, g.kind, g.recipe, g.guild_id, g.attempts"
        " FROM ("
        " SELECT jobs.id AS job_id, (jobs.args->>'generation_id')::bigint AS generation_id,"
        " EXISTS (SELECT 1 FROM procrastinate_jobs AS mine"
        "   WHERE mine.id = ANY(:taken) AND mine.lock = jobs.lock) AS lock_held"
        + _NEXT_JOB
        + ") AS next LEFT JOIN generations g ON g.id = next.generation_id"
    )
    .bindparams(bindparam("taken", type_=ARRAY(BigInteger)))
    .columns(
        column("job_id", BigInteger),
        column("lock_held", Boolean),
        _generations.c.id,
        _generations.c.kind,
        _generations.c.recipe,
        _generations.c.guild_id,
        _generations.c.attempts,
    )
)

# Take job :job for worker :worker_id as procrastinate's fetch would, if it still comes next.
_TAKE_JOB = text(
    "WITH candidate AS (SELECT jobs.id" + _NEXT_JOB + " FOR UPDATE OF jobs SKIP LOCKED) "
    "UPDATE procrastinate_jobs SET status = 'doing', worker_id = :worker_id FROM candidate "
    "WHERE procrastinate_jobs.id = candidate.id AND candidate.id = :job "
    "RETURNING procrastinate_jobs.id"
).bindparams(bindparam("taken", type_=ARRAY(BigInteger)))


async def next_in_queue(
    database: Database, queue: str, taken: Collection[int]
) -> tuple[int, Generation | None, bool] | None:
    """The job procrastinate would hand out next in ``queue`` to a worker holding the jobs
    ``taken``: its id, its generation (kind, recipe, guild and attempts only; ``None`` if
    the row is gone) and whether a job of ``taken`` holds its lock; ``None`` if no job
    waits."""
    async with database.autocommit() as connection:
        row = (
            await connection.execute(_NEXT_IN_QUEUE, {"queue": queue, "taken": list(taken)})
        ).one_or_none()
    if row is None:
        return None
    generation = None
    if row.id is not None:
        generation = Generation(
            id=row.id, kind=row.kind, recipe=row.recipe, guild_id=row.guild_id,
            attempts=row.attempts,
        )  # fmt: skip
    return int(row.job_id), generation, bool(row.lock_held)


async def take_job(
    database: Database, queue: str, job_id: int, worker_id: int, taken: Collection[int]
) -> bool:
    """Mark job ``job_id`` taken by procrastinate worker ``worker_id`` (``doing``, as its
    fetch does) if it is still the next in ``queue``; False if the order changed."""
    async with database.autocommit() as connection:
        took = await connection.scalar(
            _TAKE_JOB,
            {"queue": queue, "job": job_id, "worker_id": worker_id, "taken": list(taken)},
        )
    return took is not None


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
            generation, load = await record_submission(self.database, self.limits, submission)
        except Exception as exc:
            if is_outage(exc):
                raise QueueUnavailable() from exc
            raise
        # What the user had queued before this row is what procrastinate holds for them.
        priority = -TURN * load.waiting_for_model - min(load.served_for_model, TURN - 1)
        try:
            generation.job_id = await self._enqueue(
                generation, priority, load.jobs_so_far % max(1, load.max_running)
            )
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
        priority = -TURN * int(ahead or 0) - min(int(served or 0), TURN - 1)
        return await self._enqueue(generation, priority, slot)

    async def _enqueue(self, generation: Generation, priority: int, slot: int) -> int | None:
        """procrastinate's job for a queued row, recorded on the row (one round trip each);
        ``None`` if the row has one waiting already."""
        from procrastinate.exceptions import AlreadyEnqueued

        try:
            job_id: int = await self.app.configure_task(
                TASK,
                queue=queue_name(generation.model),
                priority=priority,
                lock=f"imagine-user:{generation.requester_id}:{slot}",
                # One waiting job per row, even when two workers reconcile at once.
                queueing_lock=f"imagine-generation:{generation.id}",
            ).defer_async(generation_id=generation.id)
        except AlreadyEnqueued:
            return None
        async with self.database.autocommit() as connection:
            await connection.execute(
                update(Generation).where(Generation.id == generation.id).values(job_id=job_id)
            )
        return job_id

    async def cancel(self, generation_id: int) -> Generation:
        generation = await record_cancel(
            self.database, self.events, self.cancellations, generation_id
        )
        job_id, manager = generation.job_id, self.app.job_manager
        # Only the call that cancelled the job gives its turn back: once.
        if (
            generation.status is S.CANCELLED
            and job_id is not None
            and await manager.cancel_job_by_id_async(job_id)
        ):
            async with self.database.session() as session:
                await give_back_turn(session, job_id, generation.requester_id)
        return generation

    async def position(self, generation_id: int) -> QueuePosition:
        # One statement, without a transaction: /imagine shows it on every submission.
        check_id("generation", generation_id)
        async with self.database.autocommit() as connection:
            row = (
                await connection.execute(
                    _POSITION,
                    {"id": generation_id, "recent": RECENT_JOBS, "stale": self.stale_seconds},
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"There is no generation {generation_id}; check the id.")
        status = S(row.status)
        if status is not S.QUEUED or row.job_id is None:
            return QueuePosition(generation_id, status, 0, 0.0)
        seconds = DEFAULT_JOB_SECONDS if row.seconds is None else float(row.seconds)
        position = int(row.ahead) + 1
        wait = estimated_wait(position, seconds, int(row.workers), bool(row.running))
        return QueuePosition(generation_id, S.QUEUED, position, wait, int(row.workers))

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
    """A worker's jobs from procrastinate: the queue of its model, the job procrastinate
    hands out with those that may share its batch (up to ``max_batch`` images).

    ``queue`` is the :class:`ProcrastinateQueue` whose open app this uses (to register
    the task, run procrastinate's worker, reconcile and retry stalled jobs)."""

    def __init__(
        self,
        queue: ProcrastinateQueue,
        heartbeat_seconds: float = 5.0,
        max_batch: int = 1,
    ) -> None:
        self.queue = queue
        self.heartbeat_seconds = heartbeat_seconds
        self.max_batch = max_batch

    async def prepare(self, model: str) -> None:
        requeued = await self.queue.reconcile(model)
        if requeued:
            log.warning("gave %d queued generation(s) a new job: %s", len(requeued), requeued)

    async def sweep(self, model: str, stale_seconds: float) -> None:
        if await self.queue.retry_stalled(model, stale_seconds):
            log.warning("retried the jobs of a worker that stopped beating")
        await self.queue.reconcile(model)

    async def serve(
        self,
        model: str,
        worker_name: str,
        run: RunJob,
        stop: asyncio.Event,
        storing: Callable[[], Collection[int]] = tuple,
    ) -> None:
        # procrastinate's locks keep the running limits: ``storing`` plays no part here.
        name = queue_name(model)
        database = self.queue.database

        async def run_generation(context: JobContext, generation_id: int) -> None:
            try:
                generation = await start_job(database, generation_id, worker_name, name)
            except IllegalTransition:
                log.info("generation %s is no longer queued; nothing to run", generation_id)
                return
            stranded: list[int] = []
            joined = await self._join(generation, context, name, worker_name, stranded)
            try:
                await run([generation, *joined.values()])
            except BaseException:
                await self._finish(joined, "failed")  # as procrastinate fails the first
                raise
            finally:
                await self._release(stranded)
            await self._finish(joined, "succeeded")

        self.queue.app.task(name=TASK, pass_context=True)(run_generation)
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

    async def _join(
        self,
        first: Generation,
        context: JobContext,
        queue: str,
        worker_name: str,
        stranded: list[int],
    ) -> dict[int, Generation]:
        """The jobs procrastinate would hand out after ``first``'s, taken and started while
        they share its batch key and their images fit; by procrastinate job id.

        It never raises: ``first`` is running already, and must run whatever happens here.
        An error (the database went away) ends the batch as it stands; a job it had taken
        but whose row it could not start is added to ``stranded``, to be released."""
        joined: dict[int, Generation] = {}
        try:
            await self._take_following(first, context, queue, worker_name, joined, stranded)
        except Exception as exc:
            log.warning(
                "generation %s runs in a batch of %d: taking more jobs failed (%s)",
                first.id,
                1 + len(joined),
                exc,
            )
        return joined

    async def _take_following(
        self,
        first: Generation,
        context: JobContext,
        queue: str,
        worker_name: str,
        joined: dict[int, Generation],
        stranded: list[int],
    ) -> None:
        key, images, worker_id = batch_key(first), first.recipe.count, context.job.worker_id
        if key is None or worker_id is None or context.job.id is None:
            return
        if ran_before(first, claimed=True):
            return  # alone: if it crashed a worker, it takes no other job down again
        database = self.queue.database
        taken = [context.job.id]
        while images < self.max_batch:
            following = await next_in_queue(database, queue, taken)
            if following is None:
                break
            job_id, candidate, lock_held = following
            if lock_held or candidate is None or ran_before(candidate, claimed=False):
                break
            if batch_key(candidate) != key:
                break
            if images + candidate.recipe.count > self.max_batch:
                break
            if not await take_job(database, queue, job_id, worker_id, taken):
                continue  # another worker took it, or one came before it: read the order again
            taken.append(job_id)
            stranded.append(job_id)  # taken, its row not running yet
            try:
                joined[job_id] = await start_job(database, candidate.id, worker_name, queue)
            except IllegalTransition:  # cancelled meanwhile: its job is done, as when alone
                await self._finish({job_id: candidate}, "succeeded")
                stranded.remove(job_id)
                continue
            stranded.remove(job_id)
            images += candidate.recipe.count

    async def _release(self, stranded: list[int]) -> None:
        """End the jobs a batch took but whose rows it could not start: their rows are
        still queued, and ``reconcile`` (at the next sweep) gives each a new job."""
        if not stranded:
            return
        try:
            await self._finish(stranded, "failed")
        except Exception as exc:
            log.warning(
                "could not release procrastinate job(s) %s (%s): their generations run "
                "once this worker restarts",
                stranded,
                exc,
            )

    async def _finish(self, jobs: Collection[int], status: str) -> None:
        """End procrastinate jobs a batch took, as procrastinate ends the job it handed out."""
        from procrastinate.jobs import Status

        for job_id in jobs:
            await self.queue.app.job_manager.finish_job_by_id_async(
                job_id=job_id, status=Status(status), delete_job=False
            )

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
