"""The embedded queue's own parts on SQLite and PostgreSQL: the fair claim, limits, recovery.

What every queue must do is in test_queue_contract.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from generation.engine import Engine
from generation.worker import Worker
from storage.blobs import LocalBlobStore
from storage.database import Database
from storage.events import LocalEventBus
from storage.generations import get_generation, transition
from storage.models import GenerationKind, GenerationStatus
from storage.queue import Cancellations, RowJobs, RowQueue, Submission
from storage.recipe import Recipe
from storage.scheduling import Limits, claim_next

S = GenerationStatus
ALICE, BOB, CAROL = 1, 2, 3
LIMITS = Limits(max_running_per_user=1, max_queued_per_user=20)


def recipe(prompt: str = "a boat", steps: int = 1) -> Recipe:
    return Recipe(
        model="tiny",
        prompt=prompt,
        seed=1,
        width=64,
        height=64,
        steps=steps,
        guidance=5.0,
        count=1,
    )


def submission(requester: int, prompt: str = "a boat", steps: int = 1) -> Submission:
    return Submission(
        kind=GenerationKind.IMAGINE, recipe=recipe(prompt, steps), requester_id=requester
    )


async def claim_order(queue: RowQueue, count: int) -> list[str]:
    """Claim and finish jobs one at a time, as one worker would; returns their prompts."""
    order = []
    for _ in range(count):
        async with queue.database.session() as session:
            generation = await claim_next(session, "w", queue.limits)
            assert generation is not None
            order.append(generation.recipe.prompt)
            await transition(session, generation.id, S.SUCCEEDED)
    return order


async def test_a_later_user_is_not_starved(database: Database) -> None:
    queue = RowQueue(database, LIMITS)
    for number in range(10):
        await queue.submit(submission(ALICE, f"alice {number}"))
    await queue.submit(submission(BOB, "bob"))
    order = await claim_order(queue, 11)
    assert order[:2] == ["alice 0", "bob"]
    assert order[2:] == [f"alice {n}" for n in range(1, 10)]


async def test_a_user_at_the_running_limit_waits(database: Database) -> None:
    queue = RowQueue(database, LIMITS)
    await queue.submit(submission(ALICE, "a0"))
    await queue.submit(submission(ALICE, "a1"))
    async with database.session() as session:
        first = await claim_next(session, "w1", LIMITS)
        assert first is not None and first.recipe.prompt == "a0"
        assert await claim_next(session, "w2", LIMITS) is None  # a1 waits for a0


async def test_a_cancelled_queued_job_never_runs(database: Database) -> None:
    queue = RowQueue(database, LIMITS)
    doomed = await queue.submit(submission(ALICE, "doomed"))
    await queue.submit(submission(BOB, "kept"))
    cancelled = await queue.cancel(doomed.id)
    assert cancelled.status is S.CANCELLED
    assert await claim_order(queue, 1) == ["kept"]
    async with database.session() as session:
        assert await claim_next(session, "w", LIMITS) is None


async def test_concurrent_claims_never_share_a_job(database: Database) -> None:
    queue = RowQueue(database, Limits(max_running_per_user=10, max_queued_per_user=20))
    for number in range(6):
        await queue.submit(submission(ALICE, str(number)))

    async def claim(worker: str) -> int | None:
        async with database.session() as session:
            generation = await claim_next(session, worker, queue.limits)
            return None if generation is None else generation.id

    claimed = await asyncio.gather(*(claim(f"w{n}") for n in range(6)))
    taken = [generation_id for generation_id in claimed if generation_id is not None]
    assert len(taken) == len(set(taken)) >= 1


async def test_rows_left_running_are_requeued_then_failed_after_too_many_tries(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    queue = RowQueue(database, LIMITS)
    worker = Worker(
        database,
        LocalBlobStore(tmp_path),
        tiny_engine,
        jobs=RowJobs(database, LIMITS),
        events=LocalEventBus(),
        cancellations=Cancellations(),
        max_attempts=2,
    )
    generation = await queue.submit(submission(ALICE))
    for expected in (S.QUEUED, S.FAILED):
        async with database.session() as session:  # a worker claims it, then dies
            await claim_next(session, "dead-worker", LIMITS)
        assert await worker.recover() == [generation.id]
        async with database.session() as session:
            row = await get_generation(session, generation.id)
        assert row.status is expected
    assert row.error is not None and "crashed the worker 2 times" in row.error


async def test_a_worker_claims_only_jobs_for_its_model(database: Database) -> None:
    queue = RowQueue(database, LIMITS)
    other = submission(ALICE, "for sdxl")
    await queue.submit(
        Submission(other.kind, other.recipe.model_copy(update={"model": "sdxl"}), ALICE)
    )
    await queue.submit(submission(BOB, "for tiny"))
    async with database.session() as session:
        claimed = await claim_next(session, "w", LIMITS, model="tiny")
        assert claimed is not None and claimed.recipe.prompt == "for tiny"
        assert await claim_next(session, "w", LIMITS, model="tiny") is None
