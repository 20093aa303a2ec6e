"""The job queue: the submitter's port, the worker's port, and their row implementations.

The generation row is the job: submitting writes it (status queued) in one
transaction after checking the user's limits. Two ports face the two sides:

* :class:`JobQueue` is what submitters (the bot, the CLI) use: submit, cancel,
  position. :class:`RowQueue` implements it over the rows alone;
  :class:`storage.scaled_queue.ProcrastinateQueue` also gives each row a
  procrastinate job.
* :class:`JobSource` is how a worker gets jobs: :class:`RowJobs` claims rows in
  the fair order of :mod:`storage.scheduling`;
  :class:`storage.scaled_queue.ProcrastinateJobs` takes the jobs procrastinate
  hands out.

:func:`bot.deployment.open_deployment` picks the pair; nothing else does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from storage.database import Database
from storage.errors import QueueUnavailable
from storage.events import EventBus, JobCancelled, LocalEventBus
from storage.generations import Origin, create_generation, lock_user, request_cancel
from storage.models import Generation, GenerationKind, GenerationStatus
from storage.recipe import Recipe
from storage.scheduling import (
    Limits,
    QueuePosition,
    UserLoad,
    claim_batch,
    position_of,
    refuse_over_limit,
    user_load,
)

log = logging.getLogger(__name__)
S = GenerationStatus
IDLE_POLL_SECONDS = 1.0

RunJob = Callable[[list[Generation]], Awaitable[object]]
"""A worker's way to run claimed generations (their rows already ``running``): one, or a
batch that shares one denoising call (:func:`storage.scheduling.claim_batch`)."""

CancelListener = Callable[[Callable[[int], object]], Coroutine[Any, Any, None]]
"""Runs until cancelled, calling its argument with the id of every running generation
that another process asked to cancel (PostgreSQL's LISTEN; SQLite has none, and the
worker polls the flag)."""


@dataclass(frozen=True)
class Submission:
    kind: GenerationKind
    recipe: Recipe
    requester_id: int
    origin: Origin = field(default_factory=Origin)
    parent_image_id: int | None = None
    priority: int = 0
    # Kept off the web gallery: an ephemeral reply, and a prompt that tripped the NSFW check.
    private: bool = False
    nsfw: bool = False


class JobQueue(Protocol):
    """The submitter's side of the queue."""

    async def submit(self, submission: Submission) -> Generation:
        """Record the job; :class:`~storage.scheduling.QueueFull` over the user's limits."""
        ...

    async def cancel(self, generation_id: int) -> Generation:
        """A queued job never runs; a running one stops within a denoising step."""
        ...

    async def position(self, generation_id: int) -> QueuePosition: ...


class JobSource(Protocol):
    """The worker's side of the queue: where its jobs come from."""

    async def prepare(self, model: str) -> None:
        """Called once when a worker for ``model`` starts, after it re-queued orphans."""
        ...

    async def sweep(self, model: str, stale_seconds: float) -> None:
        """Called every few heartbeats: make re-queued and stalled jobs runnable again."""
        ...

    async def serve(
        self,
        model: str,
        worker_name: str,
        run: RunJob,
        stop: asyncio.Event,
        storing: Callable[[], Collection[int]] = tuple,
    ) -> None:
        """Claim jobs of ``model`` (one, or a batch) and ``run`` them until ``stop`` is set;
        the jobs in hand finish first. ``storing()``: the worker's jobs whose images are
        being stored; they no longer hold their users' running limits."""
        ...


class Cancellations:
    """How to stop the generations running in this process, by id."""

    def __init__(self) -> None:
        self._hooks: dict[int, Callable[[], None]] = {}

    def stop(self, generation_id: int) -> bool:
        """Stop a generation running in this process at its next step; False if none is."""
        hook = self._hooks.get(generation_id)
        if hook is not None:
            hook()
        return hook is not None

    def register(self, generation_id: int, hook: Callable[[], None] | None) -> None:
        """Register (or with ``None`` remove) how to stop a running generation."""
        if hook is None:
            self._hooks.pop(generation_id, None)
        else:
            self._hooks[generation_id] = hook


async def record_submission(
    database: Database, limits: Limits, submission: Submission
) -> tuple[Generation, UserLoad]:
    """Check the user's limits and write the queued row, in one transaction of five round
    trips; returns the row and what the user had queued before it.

    The user's row is locked first, so that their submissions are counted one at a time:
    two at once cannot both pass a limit that has room for one."""
    requester_id, origin = submission.requester_id, submission.origin
    async with database.session() as session:
        await lock_user(session, requester_id)
        load = await user_load(
            session, requester_id, origin.guild_id, submission.recipe.model, limits
        )
        refuse_over_limit(load)
        generation = await create_generation(
            session,
            requester_known=True,
            kind=submission.kind,
            recipe=submission.recipe,
            requester_id=submission.requester_id,
            origin=submission.origin,
            parent_image_id=submission.parent_image_id,
            priority=submission.priority,
            private=submission.private,
            nsfw=submission.nsfw,
        )
    return generation, load


async def record_cancel(
    database: Database, events: EventBus, cancellations: Cancellations, generation_id: int
) -> Generation:
    """Flag the row; a queued job is cancelled now, a running one is stopped where it runs
    (here at once; elsewhere by NOTIFY or by the worker's poll of the flag)."""
    async with database.session() as session:
        generation = await request_cancel(session, generation_id)
    if generation.status is S.CANCELLED:
        events.publish(JobCancelled(generation_id=generation_id))
    elif generation.status is S.RUNNING:
        cancellations.stop(generation_id)
    return generation


class RowQueue:
    """Jobs are rows; workers claim them in the fair order (:class:`RowJobs`)."""

    def __init__(
        self,
        database: Database,
        limits: Limits,
        events: EventBus | None = None,
        cancellations: Cancellations | None = None,
        wakeup: asyncio.Event | None = None,
        stale_seconds: float = 30.0,
    ) -> None:
        self.database = database
        self.limits = limits
        self.events: EventBus = events or LocalEventBus()
        self.cancellations = cancellations or Cancellations()
        self.wakeup = wakeup or asyncio.Event()  # shared with the in-process workers' RowJobs
        self.stale_seconds = stale_seconds

    async def submit(self, submission: Submission) -> Generation:
        generation, _load = await record_submission(self.database, self.limits, submission)
        self.wakeup.set()
        return generation

    async def cancel(self, generation_id: int) -> Generation:
        return await record_cancel(self.database, self.events, self.cancellations, generation_id)

    async def position(self, generation_id: int) -> QueuePosition:
        async with self.database.session() as session:
            return await position_of(session, generation_id, stale_seconds=self.stale_seconds)


class RowJobs:
    """A worker's jobs straight from the rows: claim the next in the fair order (with the
    compatible ones right after it, up to ``max_batch`` images), or wait for a submission
    in this process (``wakeup``) or a poll interval."""

    def __init__(
        self,
        database: Database,
        limits: Limits,
        wakeup: asyncio.Event | None = None,
        idle_poll_seconds: float = IDLE_POLL_SECONDS,
        max_batch: int = 1,
    ) -> None:
        self.database = database
        self.limits = limits
        self.wakeup = wakeup or asyncio.Event()
        self.idle_poll_seconds = idle_poll_seconds
        self.max_batch = max_batch

    async def prepare(self, model: str) -> None:
        self.wakeup.set()

    async def sweep(self, model: str, stale_seconds: float) -> None:
        self.wakeup.set()  # rows re-queued by the worker's recovery are claimable now

    async def serve(
        self,
        model: str,
        worker_name: str,
        run: RunJob,
        stop: asyncio.Event,
        storing: Callable[[], Collection[int]] = tuple,
    ) -> None:
        while not stop.is_set():
            try:
                async with self.database.session() as session:
                    batch = await claim_batch(
                        session, worker_name, self.limits, model, self.max_batch, storing()
                    )
            except QueueUnavailable:
                log.warning("the queue is locked by another program; claiming again soon")
                batch = []
            if batch:
                await run(batch)
                continue
            self.wakeup.clear()
            waiters = [asyncio.ensure_future(e.wait()) for e in (stop, self.wakeup)]
            await asyncio.wait(
                waiters, timeout=self.idle_poll_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in waiters:
                waiter.cancel()
