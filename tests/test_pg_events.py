"""Events across processes on PostgreSQL: NOTIFY from workers, LISTEN plus a sweep in the bot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from storage.database import Database
from storage.generations import NewImage, add_images, mark_delivered, transition
from storage.models import GenerationKind, GenerationStatus
from storage.pg_events import Notifier, decode, encode, final_events_since, listen
from storage.queue import EmbeddedQueue, JobEvent, JobProgress, JobStarted, JobSucceeded, Submission
from storage.recipe import Recipe
from storage.scheduling import Limits
from tests.conftest import migrated_database

S = GenerationStatus
RECIPE = Recipe(model="tiny", prompt="p", seed=1, width=64, height=64, steps=1, guidance=1)


def test_events_survive_the_wire_without_their_preview() -> None:
    event = JobProgress(generation_id=7, step=3, total=10, preview=b"\xff" * 20_000)
    wire = encode(event)
    assert len(wire.encode()) < 8000  # NOTIFY's payload limit
    back = decode(wire)
    assert isinstance(back, JobProgress) and (back.step, back.total, back.preview) == (3, 10, None)


async def next_event(events: object, kind: type) -> JobEvent:
    async for event in events:  # type: ignore[attr-defined]
        if isinstance(event, kind):
            return event  # type: ignore[no-any-return]
    raise AssertionError("the event stream ended")


@pytest.fixture
async def pg_database(tmp_path: Path, request: pytest.FixtureRequest) -> Database:
    async with migrated_database("postgresql", tmp_path, request) as database:
        yield database  # type: ignore[misc]


async def test_a_worker_s_events_reach_a_listener_in_another_connection(
    pg_database: Database,
) -> None:
    events = listen(pg_database, sweep_seconds=60)
    waiting = asyncio.ensure_future(next_event(events, JobStarted))
    await asyncio.sleep(0.5)  # let the listener connect
    notifier = Notifier(pg_database.url)
    worker_side = EmbeddedQueue(pg_database, Limits(1, 10), forward=notifier.send)
    worker_side.publish(JobStarted(generation_id=42, worker_name="gpu-7"))
    started = await asyncio.wait_for(waiting, 10)
    assert isinstance(started, JobStarted) and started.worker_name == "gpu-7"
    await notifier.close()
    await events.aclose()


async def test_the_sweep_replays_a_finish_the_listener_missed_until_delivered(
    pg_database: Database,
) -> None:
    queue = EmbeddedQueue(pg_database, Limits(1, 10))
    generation = await queue.submit(Submission(GenerationKind.IMAGINE, RECIPE, 1))
    async with pg_database.session() as session:  # finished with no NOTIFY at all
        await transition(session, generation.id, S.RUNNING, worker_name="w")
        (image,) = await add_images(
            session, generation.id, [NewImage(0, 1, 64, 64, "a" * 64, "a" * 64)]
        )
        await transition(session, generation.id, S.SUCCEEDED)
    events = listen(pg_database, sweep_seconds=0.2)
    succeeded = await asyncio.wait_for(next_event(events, JobSucceeded), 10)
    assert isinstance(succeeded, JobSucceeded)
    assert succeeded.generation_id == generation.id and succeeded.image_ids == [image.id]
    await events.aclose()
    before = generation.queued_at
    assert [e.generation_id for e in await final_events_since(pg_database, before)] == [
        generation.id
    ]
    async with pg_database.session() as session:
        assert await mark_delivered(session, generation.id)
    assert await final_events_since(pg_database, before) == []  # delivered: not replayed
