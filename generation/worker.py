"""The worker: takes jobs from a deployment's job source and runs them on an engine.

One :class:`Worker` class serves both modes; what differs (claiming rows or taking
procrastinate's jobs, in-process events or NOTIFY) comes from the ports that
:func:`bot.deployment.open_deployment` hands out. One job, or one batch of compatible
jobs (``IMAGINE_MAX_BATCH``), at a time on one engine; the engine runs on a thread, so
the event loop (and a Discord bot beside it) stays responsive. A claim's images are
encoded and stored in the background while the engine runs the next one (at most
``MAX_FINISHING`` claims so, to bound memory). Rows left running by a stopped worker
are re-queued, up to ``IMAGINE_MAX_ATTEMPTS`` starts in all. A worker whose jobs keep
failing stops claiming (``max_consecutive_failures``) and says why, so that a
supervisor can restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import timedelta

from generation.engine import CancelToken, Engine, Progress
from generation.jobs import Generated, JobOutcome, finish_generation, generate_batch
from generation.metrics import WorkerMetrics
from storage.blobs import BlobStore
from storage.database import Database, is_outage
from storage.deployment import Deployment
from storage.errors import IllegalTransition, ImagineError
from storage.events import (
    EventBus,
    JobFailed,
    JobProgress,
    JobStarted,
    final_event,
)
from storage.generations import cancel_requested, get_generation, transition
from storage.models import Generation, GenerationStatus
from storage.queue import Cancellations, CancelListener, JobSource
from storage.scheduling import heartbeat, queue_depth, requeue_orphans

log = logging.getLogger(__name__)
S = GenerationStatus
CANCEL_POLL_SECONDS = 0.5
MAX_FINISHING = 2  # jobs encoding and storing their images while the engine runs the next
SHUTDOWN_GRACE_SECONDS = 10.0  # for a heartbeat under way when the worker stops


class Worker:
    def __init__(
        self,
        database: Database,
        blobs: BlobStore,
        engine: Engine,
        *,
        jobs: JobSource,
        events: EventBus,
        cancellations: Cancellations,
        cancel_listener: CancelListener | None = None,
        name: str = "embedded",
        max_attempts: int = 3,
        max_consecutive_failures: int = 0,
        heartbeat_seconds: float = 5.0,
        stale_seconds: float = 30.0,
        metrics: WorkerMetrics | None = None,
        max_finishing: int = MAX_FINISHING,
    ) -> None:
        self.database = database
        self.blobs = blobs
        self.engine = engine
        self.jobs = jobs
        self.events = events
        self.cancellations = cancellations
        self.cancel_listener = cancel_listener
        self.name = name
        self.max_attempts = max_attempts
        self.max_consecutive_failures = max_consecutive_failures
        self.failures_in_a_row = 0
        self.gave_up: str | None = None
        """Why this worker stopped claiming jobs; ``None`` while it serves."""
        self._halt = asyncio.Event()
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_after = timedelta(seconds=stale_seconds)
        self.metrics = metrics or WorkerMetrics()
        self.metrics.watch_engine(engine)
        self._finishing: set[asyncio.Task[None]] = set()
        self.max_finishing = max_finishing
        """Jobs stored in the background at once; 0 stores each before the next job."""
        self._finishing_slots = asyncio.Semaphore(max_finishing)
        self._storing: set[int] = set()
        """Jobs whose engine part is done and whose images are being stored."""

    @classmethod
    def for_deployment(
        cls,
        deployment: Deployment,
        engine: Engine,
        *,
        name: str,
        heartbeat_seconds: float | None = None,
        max_consecutive_failures: int = 0,
    ) -> Worker:
        """A worker on ``deployment``'s ports, with its settings' heartbeat timings and
        attempts; it stops after ``max_consecutive_failures`` failed jobs (0: never)."""
        settings = deployment.settings
        return cls(
            deployment.database,
            deployment.blobs,
            engine,
            jobs=deployment.jobs,
            events=deployment.events,
            cancellations=deployment.cancellations,
            cancel_listener=deployment.cancel_listener,
            name=name,
            max_attempts=settings.max_attempts,
            max_consecutive_failures=max_consecutive_failures,
            heartbeat_seconds=heartbeat_seconds or settings.worker_heartbeat_seconds,
            stale_seconds=settings.worker_stale_seconds,
        )

    @property
    def model(self) -> str:
        return self.engine.model_id

    async def beat(self) -> None:
        async with self.database.session() as session:
            await heartbeat(session, self.name, self.model)

    async def recover(self, *, at_start: bool = True) -> list[int]:
        """Re-queue jobs of dead workers (at start: also this worker's own, from before)."""
        async with self.database.session() as session:
            orphans = await requeue_orphans(
                session,
                self.max_attempts,
                stale_after=self.stale_after,
                own_name=self.name if at_start else None,
            )
        if orphans:
            log.warning("re-queued %d generation(s) of stopped workers: %s", len(orphans), orphans)
            await self._announce_given_up(orphans)
        return orphans

    async def _announce_given_up(self, orphans: list[int]) -> None:
        """Orphans out of attempts were failed: their requesters hear it now."""
        async with self.database.session() as session:
            finished = [await get_generation(session, orphan) for orphan in orphans]
        for generation in finished:
            final = final_event(generation)
            if generation.status is S.FAILED and final is not None:
                log.error("generation %s failed: %s", generation.id, generation.error)
                self.events.publish(final)

    async def _keep_alive(self) -> None:
        """Heartbeats, and every other beat a sweep for jobs of workers that went quiet.
        Stopped (the worker is ending) in the middle of a beat, it lets the beat's queries
        finish first, for up to ``SHUTDOWN_GRACE_SECONDS``: cancelled mid-query, the
        connection pool logged a traceback on the way out."""
        beats = 0
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            beats += 1
            beat = asyncio.ensure_future(self._beat_and_sweep(sweep=beats % 2 == 0))
            try:
                await asyncio.shield(beat)
            except asyncio.CancelledError:
                await asyncio.wait([beat], timeout=SHUTDOWN_GRACE_SECONDS)
                beat.cancel()  # still waiting on a database that does not answer
                raise

    async def _beat_and_sweep(self, *, sweep: bool) -> None:
        try:
            await self.beat()
            async with self.database.session() as session:
                self.metrics.queue_depth.set(await queue_depth(session, self.model))
            if sweep:
                await self.recover(at_start=False)
                await self.jobs.sweep(self.model, self.stale_after.total_seconds())
        except Exception as exc:  # beat again next time: a worker that stops beating loses its jobs
            if is_outage(exc):  # a restarting database
                log.warning("no heartbeat: the database is unavailable or locked (%s)", exc)
            else:
                log.exception("the heartbeat failed; trying again in %ss", self.heartbeat_seconds)

    async def run(self, stop: asyncio.Event) -> None:
        """Run jobs until ``stop`` is set, or until too many failed in a row
        (:attr:`gave_up` says so); the job in hand is finished first."""
        self._halt = asyncio.Event()
        await self.beat()
        await self.recover()
        await self.jobs.prepare(self.model)
        background = [
            asyncio.create_task(self._keep_alive()),
            asyncio.create_task(_pass_on(stop, self._halt)),
        ]
        if self.cancel_listener is not None:  # the row's flag is polled all the same
            background.append(asyncio.create_task(self.cancel_listener(self.cancellations.stop)))
        try:
            await self.jobs.serve(
                self.model, self.name, self.run_claimed, self._halt, self._storing.copy
            )
            await self.finishing_done()
        finally:  # stopped by an error or cancelled: rows still running are re-queued later
            for task in [*background, *self._finishing]:
                task.cancel()
            await asyncio.gather(*background, *self._finishing, return_exceptions=True)

    async def finishing_done(self) -> None:
        """Wait until the jobs whose images are being stored are finished."""
        while self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    async def run_claimed(self, generations: list[Generation]) -> None:
        """Run generations the job source claimed for this worker (one, or a batch sharing
        one denoising call): the engine's part now, the storing of their images in the
        background (at most ``max_finishing`` claims at once) while the engine takes the
        next. Whatever breaks in the bookkeeping fails the jobs with a sentence: their rows
        never stay ``running`` under a live worker."""
        try:
            results = await self._generate(generations)
        except Exception as exc:
            await self.finishing_done()  # failures in a row are counted in the jobs' order
            for generation in generations:
                await self._bookkeeping_broke(generation.id, exc)
            return
        made: list[Generated] = []
        for result in results:
            if isinstance(result, Generated):
                made.append(result)
                continue
            if result.generation.status is S.FAILED:
                await self.finishing_done()
            self._finished(result, len(generations))
        if not made:
            return
        if self.max_finishing == 0:
            await self._finish(made, len(generations))
            return
        await self._finishing_slots.acquire()
        self._storing.update(generated.generation.id for generated in made)
        task = asyncio.create_task(self._finish(made, len(generations)))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        task.add_done_callback(lambda _: self._finishing_slots.release())

    async def _finish(self, made: list[Generated], batch: int) -> None:
        """Store the jobs of one claim, one after another: the first in the fair order
        is delivered first, and each is announced once, when its images are stored."""
        for generated in made:
            try:
                outcome = await finish_generation(self.database, self.blobs, generated)
            except Exception as exc:
                await self._bookkeeping_broke(generated.generation.id, exc)
            else:
                self._finished(outcome, batch)
            finally:
                self._storing.discard(generated.generation.id)

    async def _bookkeeping_broke(self, generation_id: int, exc: Exception) -> None:
        if is_outage(exc):
            await self._run_again_later(generation_id, exc)
            return
        if isinstance(exc, IllegalTransition):  # its row moved on without this worker
            self._taken_over(exc)
            return
        log.error("generation %s broke the worker's bookkeeping", generation_id, exc_info=exc)
        reason = str(exc) if isinstance(exc, ImagineError) else f"{type(exc).__name__}: {exc}"
        try:
            async with self.database.session() as session:
                await transition(session, generation_id, S.FAILED, error=reason, owner=self.name)
            self.events.publish(JobFailed(generation_id=generation_id, error=reason))
        except IllegalTransition as moved:
            self._taken_over(moved)
            return
        except Exception:
            log.exception("could not record the failure of generation %s", generation_id)
        self._count(S.FAILED)

    def _taken_over(self, refused: IllegalTransition) -> None:
        """A row this worker ran is no longer its own: the only other hand that moves a
        running row is the sweep of a worker that stopped beating (this one, while the
        database was away), and another worker runs it again. Not a failure of the job."""
        log.warning(
            "generation %s is no longer this worker's (%s): it was re-queued while this "
            "worker's heartbeat was missing, so its result here is dropped",
            refused.generation_id,
            refused,
        )

    def _count(self, status: GenerationStatus) -> None:
        """Track failures in a row; at the limit, stop claiming (the caller's job is done)."""
        if status is S.FAILED:
            self.failures_in_a_row += 1
        elif status is S.SUCCEEDED:
            self.failures_in_a_row = 0
        self.metrics.failures_in_a_row.set(self.failures_in_a_row)
        limit = self.max_consecutive_failures
        if limit and self.failures_in_a_row >= limit and self.gave_up is None:
            self.gave_up = (
                f"{self.failures_in_a_row} jobs in a row failed on worker {self.name}; "
                "it stops claiming jobs so that its supervisor restarts it "
                "(read the errors above: a broken GPU, a full disk, a bad model)"
            )
            log.error("stopping: %s", self.gave_up)
            self.metrics.stopped.set(1)
            self._halt.set()

    async def _run_again_later(self, generation_id: int, exc: Exception) -> None:
        """The database went away during the job: once it is back, the row is queued
        again (if it is still this worker's) and runs again; its result is never lost."""
        log.warning("generation %s lost the database (%s); it will run again", generation_id, exc)
        await self.database.wait_until_back()
        # Unless the row moved on meanwhile: a sweep re-queued it, or it ended.
        with contextlib.suppress(IllegalTransition):
            async with self.database.session() as session:
                await transition(session, generation_id, S.QUEUED, owner=self.name)

    async def _generate(self, generations: list[Generation]) -> list[Generated | JobOutcome]:
        tokens = [CancelToken() for _ in generations]
        watchers = []
        for generation, token in zip(generations, tokens, strict=True):
            self.events.publish(JobStarted(generation_id=generation.id, worker_name=self.name))
            self.cancellations.register(generation.id, token.cancel)
            watchers.append(asyncio.create_task(self._watch_for_cancel(generation.id, token)))
        try:
            return await generate_batch(
                self.database,
                self.blobs,
                self.engine,
                generations,
                progress=[self._progress_publisher(generation.id) for generation in generations],
                cancel=tokens,
                failures_allowed=self.max_consecutive_failures - self.failures_in_a_row
                if self.max_consecutive_failures
                else None,
            )
        finally:
            for generation, watcher in zip(generations, watchers, strict=True):
                watcher.cancel()
                self.cancellations.register(generation.id, None)

    def _finished(self, outcome: JobOutcome, batch: int = 1) -> None:
        """Count, announce and log a job's end."""
        finished = outcome.generation
        self._count(finished.status)
        self.metrics.job_finished(finished.status, outcome.seconds)
        final = final_event(finished)
        if final is not None:
            self.events.publish(final)
        log.info(
            "generation %s %s in %.2fs (queued %.2fs before, in a batch of %d) on %s",
            finished.id,
            finished.status.value,
            outcome.seconds,
            _waited(finished),
            batch,
            self.name,
        )

    async def _watch_for_cancel(self, generation_id: int, token: CancelToken) -> None:
        """Another process (``imagine cancel``) flags the row; stop the run when it does."""
        while not token.cancelled:
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            # Shielded: when the job ends during a query, the query finishes and hands its
            # connection back; cancelled in the middle, the pool logged a traceback.
            if await asyncio.shield(self._cancel_flagged(generation_id)):
                token.cancel()

    async def _cancel_flagged(self, generation_id: int) -> bool:
        try:
            async with self.database.session() as session:
                return await cancel_requested(session, generation_id)
        except Exception as exc:  # a restarting database: ask again next time
            if not is_outage(exc):
                raise
            return False

    def _progress_publisher(self, generation_id: int) -> Callable[[Progress], None]:
        loop = asyncio.get_running_loop()

        def publish(progress: Progress) -> None:  # called on the engine's thread
            event = JobProgress(
                generation_id=generation_id,
                step=progress.step,
                total=progress.total,
                preview=progress.preview,
            )
            loop.call_soon_threadsafe(self.events.publish, event)

        return publish


async def _pass_on(stop: asyncio.Event, halt: asyncio.Event) -> None:
    await stop.wait()
    halt.set()


def _waited(generation: Generation) -> float:
    if generation.started_at is None:
        return 0.0
    return (generation.started_at - generation.queued_at).total_seconds()
