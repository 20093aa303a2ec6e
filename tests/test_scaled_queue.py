"""The scaled queue's own parts: procrastinate jobs carrying rows (the contract is in
test_queue_contract.py)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import inspect, text

import generation.worker
from bench.round_trips import RoundTrips
from generation.engine import Engine
from generation.worker import Worker
from storage.errors import IllegalTransition
from storage.generations import NewImage, get_generation
from storage.models import GenerationKind, GenerationStatus
from storage.queue import RowQueue, Submission
from storage.recipe import StyleRef
from storage.results import record_success
from storage.scaled_queue import queue_name, start_job
from storage.thumbnails import NewThumbnail
from tests.conftest import migrated_database
from tests.test_queue import pixels
from tests.test_queue_contract import (
    LIMITS,
    A,
    B,
    Backend,
    C,
    all_finished,
    open_backend,
    rows,
    run_order,
    submission,
    work_until,
)

S = GenerationStatus


@pytest.fixture
async def scaled(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with (
        migrated_database("postgresql", tmp_path, request) as database,
        open_backend("procrastinate", database, tmp_path) as backend,
    ):
        yield backend


async def test_cancelling_a_queued_row_cancels_its_procrastinate_job(
    scaled: Backend, tiny_engine: Engine, tmp_path: Path
) -> None:
    doomed = await scaled.queue.submit(submission(A))
    kept = await scaled.queue.submit(submission(B))
    assert (await scaled.queue.cancel(doomed.id)).status is S.CANCELLED
    async with scaled.database.session() as session:
        status = await session.scalar(
            text("SELECT status FROM procrastinate_jobs WHERE id = :id"), {"id": doomed.job_id}
        )
    assert status == "cancelled"

    async def kept_done() -> bool:
        return any(r.id == kept.id and r.status is S.SUCCEEDED for r in await rows(scaled.database))

    await work_until(scaled, tiny_engine, kept_done)
    first, _ = await rows(scaled.database)
    assert first.status is S.CANCELLED and first.started_at is None


async def test_rows_without_a_job_get_one_when_a_worker_starts(
    scaled: Backend, tiny_engine: Engine, tmp_path: Path
) -> None:
    # As if the submitter died between writing the row and deferring its job.
    orphan = await RowQueue(scaled.database, LIMITS).submit(submission(A))
    assert orphan.job_id is None

    async def done() -> bool:
        return all(row.status is S.SUCCEEDED for row in await rows(scaled.database))

    await work_until(scaled, tiny_engine, done)
    [row] = await rows(scaled.database)
    assert row.job_id is not None


class NotingEngine:
    """The tiny engine, noting how many round trips the worker had sent as each engine call
    starts and ends: between the end of one and the start of the next lies one job's
    bookkeeping (its result, then the next job's claim)."""

    def __init__(self, engine: Engine, round_trips: RoundTrips) -> None:
        self.engine = engine
        self.round_trips = round_trips
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def txt2img(self, *args: Any, **kwargs: Any) -> Any:
        self.starts.append(self.round_trips.count)
        try:
            return self.engine.txt2img(*args, **kwargs)
        finally:
            self.ends.append(self.round_trips.count)


async def test_a_job_costs_the_worker_four_round_trips(
    scaled: Backend, tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its result (images, thumbnails, grid, status: one statement), its blobs (one), the next
    # job's claim (one) and the look for jobs to batch with it (one: here the next job of A
    # waits for A's lock). Each extra statement costs the worker about half a millisecond:
    # bench/queue_throughput.py --only bookkeeping measures the whole.
    monkeypatch.setattr(generation.worker, "CANCEL_POLL_SECONDS", 3600)  # no poll in between
    jobs = 3
    for number in range(jobs):
        await scaled.queue.submit(submission(A, f"job {number}"))
    with RoundTrips(scaled.database.engine) as round_trips:
        engine = NotingEngine(tiny_engine, round_trips)
        worker = Worker.for_deployment(
            scaled.deployment, cast(Engine, engine), name="w", heartbeat_seconds=3600
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        async with asyncio.timeout(120):
            while len(engine.ends) < jobs:
                assert not running.done(), running.exception()
                await asyncio.sleep(0.05)
        stop.set()
        await running
    statements = round_trips.statements
    for end, start in zip(engine.ends, engine.starts[1:], strict=False):
        assert 1 <= start - end <= 4, statements[end:start]
    assert all(row.status is S.SUCCEEDED and row.images for row in await rows(scaled.database))


def test_each_model_has_its_own_queue() -> None:
    assert queue_name("tiny") != queue_name("tiny-sdxl")
    assert queue_name("stabilityai/stable-diffusion-xl-base-1.0").startswith(
        "imagine.stabilityai-stable-diffusion-xl-base-1-0."
    )


async def test_jobs_that_share_settings_run_in_one_batch_with_the_images_they_get_alone(
    scaled: Backend, tiny_engine: Engine, pipeline_calls: list[int]
) -> None:
    recipes = [
        submission(A, "a lighthouse").recipe.model_copy(update={"count": 2, "seed": 5}),
        submission(B, "a red bicycle").recipe.model_copy(update={"count": 1, "seed": 9}),
        submission(C, "a harbour").recipe.model_copy(update={"count": 3, "seed": 1}),
    ]
    submitted = [
        await scaled.queue.submit(Submission(GenerationKind.IMAGINE, one, user))
        for user, one in zip((A, B, C), recipes, strict=True)
    ]
    await work_until(scaled, tiny_engine, all_finished(scaled.database))
    assert pipeline_calls == [6]  # IMAGINE_MAX_BATCH is 8
    finished = await rows(scaled.database)
    assert [row.status for row in finished] == [S.SUCCEEDED] * 3
    async with scaled.database.session() as session:
        events = (
            await session.execute(
                text("SELECT job_id, type FROM procrastinate_events ORDER BY job_id, id")
            )
        ).all()
    # Each row's own job was taken as procrastinate takes one, and finished on its own.
    assert [(job, str(kind)) for job, kind in events] == [
        (row.job_id, kind) for row in submitted for kind in ("deferred", "started", "succeeded")
    ]
    pipeline_calls.clear()
    for row, one in zip(finished, recipes, strict=True):
        alone = tiny_engine.txt2img(one)
        assert len(row.images) == len(alone) == one.count
        for image, expected in zip(sorted(row.images, key=lambda i: i.index), alone, strict=True):
            got = PILImage.open(io.BytesIO(await scaled.deployment.blobs.get(image.blob_key)))
            assert np.abs(pixels(got) - pixels(expected.image)).max() <= 1  # 1/255


async def test_a_batch_is_what_procrastinate_would_hand_out_one_after_another(
    scaled: Backend, tiny_engine: Engine, pipeline_calls: list[int]
) -> None:
    D = 104
    for user, prompt, steps in [
        (A, "a0", 1),
        (A, "a1", 1),
        (A, "a2", 1),
        (B, "b0", 1),
        (C, "c0", 2),  # does not fit a0's batch
        (D, "d0", 1),
    ]:
        one = submission(user, prompt, steps)
        await scaled.queue.submit(replace(one, recipe=one.recipe.model_copy(update={"count": 1})))
    await work_until(scaled, tiny_engine, all_finished(scaled.database))
    finished = await rows(scaled.database)
    # One at a time the order is a0 b0 c0 d0 a1 a2: d0 fits a0's batch but would overtake c0,
    # and a1 waits for a0's lock (one running job per user), so a1 joins d0's batch.
    assert run_order(finished) == [A, B, C, D, A, A]
    assert pipeline_calls == [2, 1, 2, 1]


def _columns(row: object) -> dict[str, object]:
    return {
        attribute.key: getattr(row, attribute.key) for attribute in inspect(row).mapper.column_attrs
    }


async def test_a_claim_and_a_success_hand_back_the_row_as_a_session_loads_it(
    scaled: Backend,
) -> None:
    recipe = submission(A).recipe.model_copy(
        update={"styles": (StyleRef(name="ink", weight=0.5), StyleRef(name="wash", weight=1.0))}
    )
    queued = await scaled.queue.submit(Submission(GenerationKind.IMAGINE, recipe, A))
    database = scaled.database
    claimed = await start_job(database, queued.id, "w", queue_name(recipe.model))
    async with database.session() as session:
        loaded = await get_generation(session, queued.id)
    assert claimed.status is S.RUNNING and _columns(claimed) == _columns(loaded)
    assert [_columns(style) for style in claimed.styles] == [
        _columns(style) for style in loaded.styles
    ]
    keys = await scaled.deployment.blobs.put_many([b"second", b"first", b"thumb"])
    images = [NewImage(1, 8, 64, 64, keys[0], keys[0]), NewImage(0, 7, 64, 64, keys[1], keys[1])]
    thumbnails = [[NewThumbnail(256, keys[2], 8, 8)], [NewThumbnail(256, keys[2], 8, 8)]]
    done = await record_success(database, queued.id, images, thumbnails, keys[2], recipe, owner="w")
    async with database.session() as session:
        loaded = await get_generation(session, queued.id)
    assert done.status is S.SUCCEEDED and _columns(done) == _columns(loaded)
    assert [image.index for image in done.images] == [0, 1]
    assert [_columns(image) for image in done.images] == [_columns(i) for i in loaded.images]
    assert all(inspect(row).detached for row in (done, *done.images, *done.styles))
    with pytest.raises(IllegalTransition):
        await start_job(database, queued.id, "w", queue_name(recipe.model))


async def test_procrastinate_replaces_connections_the_server_ended(scaled: Backend) -> None:
    # Its pool checks a connection with a query only when the socket has something to read:
    # a server that ended the connection (a restart, an operator) has said so there.
    await scaled.queue.submit(submission(A, "before"))
    async with scaled.database.autocommit() as connection:
        ended = await connection.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    assert ended
    await asyncio.sleep(0.2)  # their goodbyes arrive
    after = await scaled.queue.submit(submission(A, "after"))
    assert after.job_id is not None


async def test_a_batch_that_cannot_take_more_jobs_runs_the_jobs_it_has(
    scaled: Backend,
    tiny_engine: Engine,
    pipeline_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database fails as a batch starts its second job's row, the job already taken
    from procrastinate: the first job still runs (alone) instead of staying running for
    good; the second's job is released, so its row gets a new one at the next sweep; and
    every job succeeds."""
    import storage.scaled_queue as scaled_queue

    for user, prompt in ((A, "a lighthouse"), (B, "a red bicycle"), (C, "a harbour")):
        one = submission(user, prompt)
        await scaled.queue.submit(replace(one, recipe=one.recipe.model_copy(update={"count": 1})))
    real_start = scaled_queue.start_job
    starts: list[int] = []

    async def failing_second(database: Any, generation_id: int, *args: Any) -> Any:
        starts.append(generation_id)
        if len(starts) == 2:
            raise ConnectionResetError("the database went away")
        return await real_start(database, generation_id, *args)

    monkeypatch.setattr(scaled_queue, "start_job", failing_second)
    # Heartbeats 5 times a second: a sweep (every other beat) gives the row its new job.
    await work_until(scaled, tiny_engine, all_finished(scaled.database), heartbeat_seconds=0.2)
    finished = await rows(scaled.database)
    assert [row.status for row in finished] == [S.SUCCEEDED] * 3
    assert pipeline_calls == [1, 1, 1]  # the first alone; the third could not join it either
    second = finished[1]
    async with scaled.database.session() as session:
        jobs = (
            await session.execute(
                text("SELECT status FROM procrastinate_jobs WHERE args->>'generation_id' = :id"),
                {"id": str(second.id)},
            )
        ).all()
    assert sorted(str(status) for (status,) in jobs) == ["failed", "succeeded"]
