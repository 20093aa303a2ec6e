"""Events across processes on PostgreSQL: NOTIFY from workers, LISTEN plus a sweep in the bot."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage

from storage.database import Database
from storage.events import (
    JobEvent,
    JobFailed,
    JobProgress,
    JobStarted,
    JobSucceeded,
    final_events_since,
)
from storage.generations import NewImage, add_images, mark_delivered, transition
from storage.models import GenerationKind, GenerationStatus
from storage.pg_events import PostgresEventBus, decode, encode, listen
from storage.queue import RowQueue, Submission
from storage.recipe import Recipe
from storage.scheduling import Limits
from tests.conftest import migrated_database

S = GenerationStatus
RECIPE = Recipe(model="tiny", prompt="p", seed=1, width=64, height=64, steps=1, guidance=1)


def jpeg(side: int, seed: int = 0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_a_small_preview_crosses_the_wire_unchanged() -> None:
    preview = jpeg(24)
    event = JobProgress(generation_id=7, step=3, total=10, preview=preview)
    back = decode(encode(event))
    assert isinstance(back, JobProgress) and (back.step, back.total) == (3, 10)
    assert back.preview == preview


def test_a_large_preview_is_shrunk_to_fit_notify_s_limit() -> None:
    preview = jpeg(256)
    assert len(preview) > 8000
    wire = encode(JobProgress(generation_id=7, step=3, total=10, preview=preview))
    assert len(wire.encode()) <= 8000  # NOTIFY's payload limit
    back = decode(wire)
    assert isinstance(back, JobProgress) and back.preview is not None
    with PILImage.open(io.BytesIO(back.preview)) as image:
        assert image.format == "JPEG" and 16 <= image.width < 256


def test_a_preview_that_is_not_an_image_is_left_out() -> None:
    wire = encode(JobProgress(generation_id=7, step=3, total=10, preview=b"\xff" * 20_000))
    assert len(wire.encode()) <= 8000
    back = decode(wire)
    assert isinstance(back, JobProgress) and back.preview is None


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
    worker_side = PostgresEventBus(pg_database)
    worker_side.publish(JobStarted(generation_id=42, worker_name="gpu-7"))
    started = await asyncio.wait_for(waiting, 10)
    assert isinstance(started, JobStarted) and started.worker_name == "gpu-7"
    await worker_side.close()
    await events.aclose()


async def test_the_sweep_replays_a_finish_the_listener_missed_until_delivered(
    pg_database: Database,
) -> None:
    queue = RowQueue(pg_database, Limits(1, 10))
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


async def test_a_sweep_that_fails_unexpectedly_is_logged_and_tried_again(
    pg_database: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The sweep is what finds a result whose NOTIFY was lost: an error no one foresaw
    must not end it for the life of the bot."""
    import storage.pg_events

    queue = RowQueue(pg_database, Limits(1, 10))
    generation = await queue.submit(Submission(GenerationKind.IMAGINE, RECIPE, 1))
    async with pg_database.session() as session:  # finished with no NOTIFY at all
        await transition(session, generation.id, S.RUNNING, worker_name="w")
        await transition(session, generation.id, S.FAILED, error="no room")
    failures = 0

    async def failing_once(database: Database, since: Any) -> list[JobEvent]:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("a bug in the sweep")
        return await final_events_since(database, since)

    monkeypatch.setattr(storage.pg_events, "final_events_since", failing_once)
    events = listen(pg_database, sweep_seconds=0.2)
    try:
        failed = await asyncio.wait_for(next_event(events, JobFailed), 10)
    finally:
        await events.aclose()
    assert failed.generation_id == generation.id and failures == 1
    assert "the sweep for finished generations failed" in caplog.text
