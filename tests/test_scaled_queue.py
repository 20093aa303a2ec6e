"""The scaled queue's own parts: procrastinate jobs carrying rows (the contract is in
test_queue_contract.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from generation.engine import Engine
from generation.worker import EmbeddedWorker, run_with_procrastinate
from storage.blobs import LocalBlobStore
from storage.database import Database
from storage.models import Generation, GenerationKind, GenerationStatus
from storage.queue import EmbeddedQueue, Submission
from storage.recipe import Recipe
from storage.scaled_queue import ProcrastinateQueue, make_app, queue_name
from storage.scheduling import Limits
from tests.conftest import migrated_database

S = GenerationStatus
LIMITS = Limits(max_running_per_user=1, max_queued_per_user=20)
A, B, C = 101, 102, 103


def submission(user: int, prompt: str = "a boat") -> Submission:
    recipe = Recipe(
        model="tiny", prompt=prompt, seed=1, width=96, height=96, steps=1, guidance=5.0, count=1
    )
    return Submission(GenerationKind.IMAGINE, recipe, user)


@pytest.fixture
async def scaled(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ProcrastinateQueue]:
    async with migrated_database("postgresql", tmp_path, request) as database:
        app = make_app(database.url)
        async with app.open_async():
            yield ProcrastinateQueue(database, LIMITS, app)


async def run_worker_until(
    queue: ProcrastinateQueue, engine: Engine, blobs: Path, done: Any, within: float = 60
) -> None:
    worker = EmbeddedWorker(queue, LocalBlobStore(blobs), engine, name="w", heartbeat_seconds=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(run_with_procrastinate(worker, queue, stop))
    try:
        async with asyncio.timeout(within):
            while not await done():  # noqa: ASYNC110 - polling the database
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def rows(database: Database) -> list[Generation]:
    async with database.session() as session:
        return list(await session.scalars(select(Generation).order_by(Generation.id)))


async def test_cancelling_a_queued_row_cancels_its_procrastinate_job(
    scaled: ProcrastinateQueue, tiny_engine: Engine, tmp_path: Path
) -> None:
    doomed = await scaled.submit(submission(A))
    kept = await scaled.submit(submission(B))
    assert (await scaled.cancel(doomed.id)).status is S.CANCELLED
    async with scaled.database.session() as session:
        status = await session.scalar(
            text("SELECT status FROM procrastinate_jobs WHERE id = :id"), {"id": doomed.job_id}
        )
    assert status == "cancelled"

    async def kept_done() -> bool:
        return any(r.id == kept.id and r.status is S.SUCCEEDED for r in await rows(scaled.database))

    await run_worker_until(scaled, tiny_engine, tmp_path, kept_done)
    first, _ = await rows(scaled.database)
    assert first.status is S.CANCELLED and first.started_at is None


async def test_rows_without_a_job_get_one_when_a_worker_starts(
    scaled: ProcrastinateQueue, tiny_engine: Engine, tmp_path: Path
) -> None:
    # As if the submitter died between writing the row and deferring its job.
    orphan = await EmbeddedQueue(scaled.database, LIMITS).submit(submission(A))
    assert orphan.job_id is None

    async def done() -> bool:
        return all(row.status is S.SUCCEEDED for row in await rows(scaled.database))

    await run_worker_until(scaled, tiny_engine, tmp_path, done)
    [row] = await rows(scaled.database)
    assert row.job_id is not None


def test_each_model_has_its_own_queue() -> None:
    assert queue_name("tiny") != queue_name("tiny-sdxl")
    assert queue_name("stabilityai/stable-diffusion-xl-base-1.0").startswith(
        "imagine.stabilityai-stable-diffusion-xl-base-1-0."
    )
