"""The job queue: one contract, typed events, and the embedded implementation.

The generation row is the job: submitting writes it (status queued) in one
transaction, workers claim rows in the fair order of :mod:`storage.scheduling`,
and every change of status is published as an event. The embedded queue
delivers events in-process; the scaled queue (:mod:`storage.scaled_queue`)
builds on it, with procrastinate carrying the rows and NOTIFY the events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, Field

from storage.database import Database
from storage.generations import Origin, create_generation, request_cancel
from storage.models import Generation, GenerationKind, GenerationStatus, utcnow
from storage.recipe import Recipe
from storage.scheduling import Limits, QueuePosition, check_limits, position_of

S = GenerationStatus


class _Event(BaseModel):
    generation_id: int
    at: datetime = Field(default_factory=utcnow)


class JobStarted(_Event):
    kind: Literal["started"] = "started"
    worker_name: str


class JobProgress(_Event):
    kind: Literal["progress"] = "progress"
    step: int
    total: int
    preview: bytes | None = None


class JobSucceeded(_Event):
    kind: Literal["succeeded"] = "succeeded"
    image_ids: list[int]


class JobFailed(_Event):
    kind: Literal["failed"] = "failed"
    error: str


class JobCancelled(_Event):
    kind: Literal["cancelled"] = "cancelled"


JobEvent = Annotated[
    JobStarted | JobProgress | JobSucceeded | JobFailed | JobCancelled,
    Field(discriminator="kind"),
]


@dataclass(frozen=True)
class Submission:
    kind: GenerationKind
    recipe: Recipe
    requester_id: int
    origin: Origin = field(default_factory=Origin)
    parent_image_id: int | None = None
    priority: int = 0


class JobQueue(Protocol):
    async def submit(self, submission: Submission) -> Generation:
        """Record the job; :class:`~storage.scheduling.QueueFull` over the user's limits."""
        ...

    async def cancel(self, generation_id: int) -> Generation:
        """A queued job never runs; a running one stops within a denoising step."""
        ...

    async def position(self, generation_id: int) -> QueuePosition: ...

    def events(self) -> AsyncIterator[JobEvent]: ...


class EmbeddedQueue:
    """Jobs are rows in the configured database; workers live in this process."""

    def __init__(
        self,
        database: Database,
        limits: Limits,
        forward: Callable[[JobEvent], Awaitable[None]] | None = None,
    ) -> None:
        self.database = database
        self.limits = limits
        self.forward = forward  # e.g. NOTIFY, so other processes hear the events too
        self._sending: set[asyncio.Task[None]] = set()
        self.wakeup = asyncio.Event()
        self._subscribers: list[asyncio.Queue[JobEvent]] = []
        self._cancel_hooks: dict[int, Callable[[], None]] = {}
        self.workers = 1

    async def submit(self, submission: Submission) -> Generation:
        async with self.database.session() as session:
            await check_limits(
                session, submission.requester_id, submission.origin.guild_id, self.limits
            )
            generation = await create_generation(
                session,
                kind=submission.kind,
                recipe=submission.recipe,
                requester_id=submission.requester_id,
                origin=submission.origin,
                parent_image_id=submission.parent_image_id,
                priority=submission.priority,
            )
        self.wakeup.set()
        return generation

    async def cancel(self, generation_id: int) -> Generation:
        async with self.database.session() as session:
            generation = await request_cancel(session, generation_id)
        if generation.status is S.CANCELLED:
            self.publish(JobCancelled(generation_id=generation_id))
        elif generation.status is S.RUNNING:
            self.stop_running(generation_id)  # here: at once; elsewhere: NOTIFY or polling
        return generation

    async def position(self, generation_id: int) -> QueuePosition:
        async with self.database.session() as session:
            return await position_of(session, generation_id, self.workers)

    async def events(self) -> AsyncIterator[JobEvent]:
        inbox: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers.append(inbox)
        try:
            while True:
                yield await inbox.get()
        finally:
            self._subscribers.remove(inbox)

    # -- the worker's side ------------------------------------------------------------------

    def publish(self, event: JobEvent) -> None:
        for inbox in self._subscribers:
            inbox.put_nowait(event)
        if self.forward is not None:
            task = asyncio.get_running_loop().create_task(self._forward(event))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _forward(self, event: JobEvent) -> None:
        assert self.forward is not None
        try:
            await self.forward(event)
        except Exception:  # the sweep on the listening side makes up for a lost event
            logging.getLogger(__name__).exception("could not forward %s", event.kind)

    def stop_running(self, generation_id: int) -> bool:
        """Stop a generation running in this process at its next step; False if none is."""
        hook = self._cancel_hooks.get(generation_id)
        if hook is not None:
            hook()
        return hook is not None

    def on_cancel(self, generation_id: int, hook: Callable[[], None] | None) -> None:
        """Register (or with ``None`` remove) how to stop a running generation."""
        if hook is None:
            self._cancel_hooks.pop(generation_id, None)
        else:
            self._cancel_hooks[generation_id] = hook
