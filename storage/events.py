"""Job events: the typed events a worker publishes, and the event bus port.

A worker :meth:`~EventBus.publish`\\ es an event at each change of a job (started,
progress with a small preview, and one final event); the bot subscribes and turns
them into Discord messages. Two buses exist: :class:`LocalEventBus` fans events
out inside one process (the embedded mode), and
:class:`storage.pg_events.PostgresEventBus` carries them between processes with
NOTIFY plus a sweep (the scaled mode). :func:`bot.deployment.open_deployment`
chooses. This module imports neither torch nor a database driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, Field
from sqlalchemy import select

from storage.database import Database
from storage.models import Generation, GenerationStatus, utcnow

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


class Subscription(Protocol):
    """Events as they come (``async for``), until :meth:`aclose`."""

    def __aiter__(self) -> AsyncIterator[JobEvent]: ...

    async def __anext__(self) -> JobEvent: ...

    async def aclose(self) -> None: ...


class EventBus(Protocol):
    """How job events travel from workers to whoever shows them."""

    def publish(self, event: JobEvent) -> None:
        """Send ``event`` without waiting; never raises (a lost final event is made up
        for by the subscriber's sweep of finished, undelivered generations)."""
        ...

    def subscribe(self) -> Subscription:
        """Every event from now on, until the iterator is closed; final events may repeat."""
        ...

    async def close(self) -> None: ...


class LocalEventBus:
    """Fan-out inside one process: every subscriber gets every event, in order."""

    def __init__(self) -> None:
        self._subscribers: list[asyncio.Queue[JobEvent]] = []

    def publish(self, event: JobEvent) -> None:
        for inbox in self._subscribers:
            inbox.put_nowait(event)

    def subscribe(self) -> _LocalSubscription:
        """Subscribed at once, not at the first read: an event published in between (while
        the subscriber sweeps for finished generations, say) waits in its inbox. ``aclose``
        unsubscribes, read or not."""
        return _LocalSubscription(self._subscribers)

    async def close(self) -> None:
        return None


class _LocalSubscription:
    def __init__(self, subscribers: list[asyncio.Queue[JobEvent]]) -> None:
        self._subscribers = subscribers
        self._inbox: asyncio.Queue[JobEvent] = asyncio.Queue()
        subscribers.append(self._inbox)

    def __aiter__(self) -> _LocalSubscription:
        return self

    async def __anext__(self) -> JobEvent:
        if self._inbox not in self._subscribers:
            raise StopAsyncIteration
        try:
            return await self._inbox.get()
        except asyncio.CancelledError:  # its reader is stopping: as an async generator would
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._inbox in self._subscribers:
            self._subscribers.remove(self._inbox)


def final_event(generation: Generation) -> JobEvent | None:
    """The final event of a finished generation (its images loaded); ``None`` while it runs."""
    if generation.status is S.SUCCEEDED:
        return JobSucceeded(
            generation_id=generation.id, image_ids=[image.id for image in generation.images]
        )
    if generation.status is S.FAILED:
        return JobFailed(generation_id=generation.id, error=generation.error or "unknown error")
    if generation.status is S.CANCELLED:
        return JobCancelled(generation_id=generation.id)
    return None


async def final_events_since(database: Database, since: datetime) -> list[JobEvent]:
    """Final events of generations that finished since ``since`` and are not delivered."""
    async with database.session() as session:
        rows = await session.scalars(
            select(Generation).where(
                Generation.status.in_([S.SUCCEEDED, S.FAILED, S.CANCELLED]),
                Generation.finished_at >= since,
                Generation.delivered_at.is_(None),
            )
        )
        events: list[JobEvent] = []
        for generation in rows.unique():
            await session.refresh(generation, ["images"])
            event = final_event(generation)
            if event is not None:
                events.append(event)
    return events
