"""The embedded worker: claims jobs from an :class:`EmbeddedQueue` and runs them here.

One job at a time on one engine; the engine runs on a thread, so the event loop
(and the Discord bot beside it) stays responsive. Rows left running by a
previous process are re-queued at start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from generation.engine import CancelToken, Engine, Progress
from generation.jobs import JobOutcome, execute_generation
from generation.metrics import WorkerMetrics
from storage.blobs import BlobStore
from storage.generations import cancel_requested
from storage.models import Generation, GenerationStatus
from storage.queue import (
    EmbeddedQueue,
    JobCancelled,
    JobFailed,
    JobProgress,
    JobStarted,
    JobSucceeded,
)
from storage.scheduling import claim_next, heartbeat, queue_depth, requeue_orphans

log = logging.getLogger(__name__)
S = GenerationStatus
IDLE_POLL_SECONDS = 1.0
CANCEL_POLL_SECONDS = 0.5


class EmbeddedWorker:
    def __init__(
        self,
        queue: EmbeddedQueue,
        blobs: BlobStore,
        engine: Engine,
        *,
        name: str = "embedded",
        max_attempts: int = 3,
        heartbeat_seconds: float = 5.0,
        stale_seconds: float = 30.0,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.queue = queue
        self.blobs = blobs
        self.engine = engine
        self.name = name
        self.max_attempts = max_attempts
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_after = timedelta(seconds=stale_seconds)
        self.metrics = metrics or WorkerMetrics()
        # Called in the claiming transaction (the scaled queue moves the user's turns there).
        self.on_claimed: Callable[[Any, Generation], Awaitable[None]] | None = None

    async def beat(self) -> None:
        async with self.queue.database.session() as session:
            await heartbeat(session, self.name, self.engine.model_id)

    async def recover(self, *, at_start: bool = True) -> list[int]:
        """Re-queue jobs of dead workers (at start: also this worker's own, from before)."""
        async with self.queue.database.session() as session:
            orphans = await requeue_orphans(
                session,
                self.max_attempts,
                stale_after=self.stale_after,
                own_name=self.name if at_start else None,
            )
        if orphans:
            log.warning("re-queued %d generation(s) of stopped workers: %s", len(orphans), orphans)
            self.queue.wakeup.set()
        return orphans

    async def _keep_alive(self, sweep: Callable[[], Awaitable[None]] | None) -> None:
        """Heartbeats, and every other beat a sweep for jobs of workers that went quiet
        (plus the carrier's own ``sweep``, if any)."""
        beats = 0
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            await self.beat()
            async with self.queue.database.session() as session:
                self.metrics.queue_depth.set(await queue_depth(session, self.engine.model_id))
            beats += 1
            if beats % 2 == 0:
                await self.recover(at_start=False)
                if sweep is not None:
                    await sweep()

    async def hear_cancels(self) -> None:
        """On PostgreSQL, a cancel that any process requests stops the running job at its
        next step (NOTIFY); the flag is also polled, for cancels sent while reconnecting."""
        if self.queue.database.url.get_backend_name() != "postgresql":
            return
        from storage.pg_events import listen_for_cancels

        await listen_for_cancels(self.queue.database.url, self.queue.stop_running)

    def start_background(
        self, sweep: Callable[[], Awaitable[None]] | None = None
    ) -> list[asyncio.Task[None]]:
        """What runs beside the jobs: heartbeats with their sweeps, and cancels heard
        from other processes. The caller cancels the tasks when it stops."""
        return [
            asyncio.create_task(self._keep_alive(sweep)),
            asyncio.create_task(self.hear_cancels()),
        ]

    async def run(self, stop: asyncio.Event) -> None:
        """Run jobs until ``stop`` is set; the job in hand is finished first."""
        await self.beat()
        await self.recover()
        background = self.start_background()
        try:
            await self._loop(stop)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            outcome = await self.run_one()
            if outcome is None:
                self.queue.wakeup.clear()
                waiters = [asyncio.ensure_future(e.wait()) for e in (stop, self.queue.wakeup)]
                await asyncio.wait(
                    waiters, timeout=IDLE_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in waiters:
                    waiter.cancel()

    async def run_one(self) -> JobOutcome | None:
        """Claim and run the next job in the fair order; ``None`` when none can run."""
        async with self.queue.database.session() as session:
            generation = await claim_next(
                session, self.name, self.queue.limits, self.engine.model_id
            )
        if generation is None:
            return None
        return await self._execute(generation)

    async def run_claimed(self, generation_id: int) -> JobOutcome | None:
        """Run one generation a job carrier (procrastinate) handed over; ``None`` if it is
        no longer queued (cancelled, or already run after a retry)."""
        from storage.errors import IllegalTransition
        from storage.generations import transition

        try:
            async with self.queue.database.session() as session:
                generation = await transition(
                    session, generation_id, S.RUNNING, worker_name=self.name
                )
                if self.on_claimed is not None:
                    await self.on_claimed(session, generation)
        except IllegalTransition:
            log.info("generation %s is no longer queued; nothing to run", generation_id)
            return None
        return await self._execute(generation)

    async def _execute(self, generation: Generation) -> JobOutcome:
        generation_id = generation.id
        self.queue.publish(JobStarted(generation_id=generation_id, worker_name=self.name))
        token = CancelToken()
        self.queue.on_cancel(generation_id, token.cancel)
        watcher = asyncio.create_task(self._watch_for_cancel(generation_id, token))
        try:
            outcome = await execute_generation(
                self.queue.database,
                self.blobs,
                self.engine,
                generation,
                progress=self._progress_publisher(generation_id),
                cancel=token,
            )
        finally:
            watcher.cancel()
            self.queue.on_cancel(generation_id, None)
        finished = outcome.generation
        self.metrics.job_finished(finished.status, outcome.seconds)
        if finished.status is S.SUCCEEDED:
            image_ids = [image.id for image in finished.images]
            self.queue.publish(JobSucceeded(generation_id=generation_id, image_ids=image_ids))
        elif finished.status is S.CANCELLED:
            self.queue.publish(JobCancelled(generation_id=generation_id))
        else:
            self.queue.publish(
                JobFailed(generation_id=generation_id, error=finished.error or "unknown error")
            )
        log.info(
            "generation %s %s in %.2fs (queued %.2fs before) on %s",
            generation_id,
            finished.status.value,
            outcome.seconds,
            _waited(finished),
            self.name,
        )
        return outcome

    async def _watch_for_cancel(self, generation_id: int, token: CancelToken) -> None:
        """Another process (``imagine cancel``) flags the row; stop the run when it does."""
        while not token.cancelled:
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            async with self.queue.database.session() as session:
                if await cancel_requested(session, generation_id):
                    token.cancel()

    def _progress_publisher(self, generation_id: int) -> Callable[[Progress], None]:
        loop = asyncio.get_running_loop()

        def publish(progress: Progress) -> None:  # called on the engine's thread
            event = JobProgress(
                generation_id=generation_id,
                step=progress.step,
                total=progress.total,
                preview=progress.preview,
            )
            loop.call_soon_threadsafe(self.queue.publish, event)

        return publish


def _waited(generation: Generation) -> float:
    if generation.started_at is None:
        return 0.0
    return (generation.started_at - generation.queued_at).total_seconds()


async def run_with_procrastinate(worker: EmbeddedWorker, queue: Any, stop: asyncio.Event) -> None:
    """The scaled mode: procrastinate hands this worker the jobs of its model's queue.

    ``queue`` is a :class:`storage.scaled_queue.ProcrastinateQueue` whose app is open.
    Runs until ``stop`` is set; procrastinate finishes the job in hand first.
    """
    from storage.errors import ImagineError
    from storage.generations import transition
    from storage.scaled_queue import TASK, advance_turns, queue_name

    model = worker.engine.model_id
    name = queue_name(model)

    async def claimed(session: Any, generation: Generation) -> None:
        await advance_turns(session, name, generation.requester_id)

    worker.on_claimed = claimed

    async def run_generation(generation_id: int) -> None:
        try:
            await worker.run_claimed(generation_id)
        except Exception as exc:  # the row must not stay "running" under a live worker
            log.exception("generation %s broke the worker's bookkeeping", generation_id)
            reason = str(exc) if isinstance(exc, ImagineError) else f"{type(exc).__name__}: {exc}"
            try:
                async with worker.queue.database.session() as session:
                    await transition(session, generation_id, S.FAILED, error=reason)
            except Exception:
                log.exception("could not record the failure of generation %s", generation_id)

    queue.app.task(name=TASK, pass_context=False)(run_generation)
    await worker.beat()
    await worker.recover()
    requeued = await queue.reconcile(model)
    if requeued:
        log.warning("gave %d queued generation(s) a new job: %s", len(requeued), requeued)

    async def sweep() -> None:
        stale = worker.stale_after.total_seconds()
        if await queue.retry_stalled(model, stale):
            log.warning("retried the jobs of a worker that stopped beating")
        await queue.reconcile(model)

    background = worker.start_background(sweep)
    running = asyncio.create_task(
        queue.app.run_worker_async(
            queues=[name],
            concurrency=1,
            name=worker.name,
            wait=True,
            install_signal_handlers=False,
            update_heartbeat_interval=worker.heartbeat_seconds,
            stalled_worker_timeout=worker.stale_after.total_seconds(),
        )
    )
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (*background, stopping):
            task.cancel()
        if not running.done():
            running.cancel()  # procrastinate stops fetching and lets the job in hand finish
        await asyncio.gather(running, *background, return_exceptions=True)
