"""The scaled queue's own parts: procrastinate jobs carrying rows (the contract is in
test_queue_contract.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from generation.engine import Engine
from storage.models import GenerationStatus
from storage.queue import RowQueue
from storage.scaled_queue import queue_name
from tests.conftest import migrated_database
from tests.test_queue_contract import (
    LIMITS,
    A,
    B,
    Backend,
    open_backend,
    rows,
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


def test_each_model_has_its_own_queue() -> None:
    assert queue_name("tiny") != queue_name("tiny-sdxl")
    assert queue_name("stabilityai/stable-diffusion-xl-base-1.0").startswith(
        "imagine.stabilityai-stable-diffusion-xl-base-1-0."
    )
