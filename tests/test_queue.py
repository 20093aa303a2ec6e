"""The embedded queue and worker on SQLite and PostgreSQL: fairness, limits, cancel, recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from generation.engine import Engine
from generation.worker import EmbeddedWorker
from storage.blobs import LocalBlobStore
from storage.database import Database
from storage.generations import get_generation, transition
from storage.models import GenerationKind, GenerationStatus
from storage.queue import (
    EmbeddedQueue,
    JobCancelled,
    JobEvent,
    JobProgress,
    JobStarted,
    JobSucceeded,
    Submission,
)
from storage.recipe import Recipe
from storage.scheduling import Limits, QueueFull, claim_next

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


async def claim_order(queue: EmbeddedQueue, count: int) -> list[str]:
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
    queue = EmbeddedQueue(database, LIMITS)
    for number in range(10):
        await queue.submit(submission(ALICE, f"alice {number}"))
    await queue.submit(submission(BOB, "bob"))
    order = await claim_order(queue, 11)
    assert order[:2] == ["alice 0", "bob"]
    assert order[2:] == [f"alice {n}" for n in range(1, 10)]


async def test_three_users_take_turns(database: Database) -> None:
    queue = EmbeddedQueue(database, LIMITS)
    for user, name in ((ALICE, "a"), (BOB, "b"), (CAROL, "c")):
        for number in range(2):
            await queue.submit(submission(user, f"{name}{number}"))
    assert await claim_order(queue, 6) == ["a0", "b0", "c0", "a1", "b1", "c1"]


async def test_a_user_at_the_running_limit_waits(database: Database) -> None:
    queue = EmbeddedQueue(database, LIMITS)
    await queue.submit(submission(ALICE, "a0"))
    await queue.submit(submission(ALICE, "a1"))
    async with database.session() as session:
        first = await claim_next(session, "w1", LIMITS)
        assert first is not None and first.recipe.prompt == "a0"
        assert await claim_next(session, "w2", LIMITS) is None  # a1 waits for a0


async def test_the_queued_limit_refuses_with_the_count(database: Database) -> None:
    queue = EmbeddedQueue(database, Limits(max_running_per_user=1, max_queued_per_user=2))
    await queue.submit(submission(ALICE))
    await queue.submit(submission(ALICE))
    with pytest.raises(
        QueueFull, match=r"2 of your jobs are already waiting.*most allowed here is 2"
    ):
        await queue.submit(submission(ALICE))
    await queue.submit(submission(BOB))  # other users are not affected


async def test_positions_follow_the_fair_order_with_growing_waits(database: Database) -> None:
    queue = EmbeddedQueue(database, LIMITS)
    alice = [await queue.submit(submission(ALICE)) for _ in range(3)]
    bob = await queue.submit(submission(BOB))
    positions = [await queue.position(g.id) for g in (*alice, bob)]
    assert [p.position for p in positions] == [1, 3, 4, 2]
    assert positions[0].estimated_wait_seconds < positions[3].estimated_wait_seconds
    assert positions[3].estimated_wait_seconds < positions[1].estimated_wait_seconds


async def test_a_cancelled_queued_job_never_runs(database: Database) -> None:
    queue = EmbeddedQueue(database, LIMITS)
    doomed = await queue.submit(submission(ALICE, "doomed"))
    await queue.submit(submission(BOB, "kept"))
    cancelled = await queue.cancel(doomed.id)
    assert cancelled.status is S.CANCELLED
    assert await claim_order(queue, 1) == ["kept"]
    async with database.session() as session:
        assert await claim_next(session, "w", LIMITS) is None


async def test_concurrent_claims_never_share_a_job(database: Database) -> None:
    queue = EmbeddedQueue(database, Limits(max_running_per_user=10, max_queued_per_user=20))
    for number in range(6):
        await queue.submit(submission(ALICE, str(number)))

    async def claim(worker: str) -> int | None:
        async with database.session() as session:
            generation = await claim_next(session, worker, queue.limits)
            return None if generation is None else generation.id

    claimed = await asyncio.gather(*(claim(f"w{n}") for n in range(6)))
    taken = [generation_id for generation_id in claimed if generation_id is not None]
    assert len(taken) == len(set(taken)) >= 1


async def test_the_worker_runs_jobs_and_publishes_their_events(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    queue = EmbeddedQueue(database, LIMITS)
    worker = EmbeddedWorker(queue, LocalBlobStore(tmp_path), tiny_engine)
    events: list[JobEvent] = []

    async def listen() -> None:
        async for event in queue.events():
            events.append(event)
            if isinstance(event, JobSucceeded):
                return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0)
    generation = await queue.submit(submission(ALICE, steps=3))
    outcome = await worker.run_one()
    assert outcome is not None and outcome.generation.status is S.SUCCEEDED
    await asyncio.wait_for(listener, 10)
    assert isinstance(events[0], JobStarted) and events[0].generation_id == generation.id
    assert [e.step for e in events if isinstance(e, JobProgress)] == [1, 2, 3]
    assert isinstance(events[-1], JobSucceeded)
    assert events[-1].image_ids == [image.id for image in outcome.generation.images]


async def test_cancelling_a_running_job_stops_it(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    queue = EmbeddedQueue(database, LIMITS)
    worker = EmbeddedWorker(queue, LocalBlobStore(tmp_path), tiny_engine)
    generation = await queue.submit(submission(ALICE, steps=50))
    stop = asyncio.Event()
    events: list[JobEvent] = []

    async def cancel_on_first_step() -> None:
        async for event in queue.events():
            events.append(event)
            if isinstance(event, JobProgress) and event.step == 1:
                await queue.cancel(generation.id)
            if isinstance(event, JobCancelled):
                stop.set()
                return

    listener = asyncio.create_task(cancel_on_first_step())
    await asyncio.sleep(0)
    await asyncio.wait_for(worker.run(stop), 30)
    await listener
    steps = [e.step for e in events if isinstance(e, JobProgress)]
    assert steps[-1] <= 3  # stopped within a step of the request, not after 50
    async with database.session() as session:
        assert (await get_generation(session, generation.id)).status is S.CANCELLED


async def test_rows_left_running_are_requeued_then_failed_after_too_many_tries(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    queue = EmbeddedQueue(database, LIMITS)
    worker = EmbeddedWorker(queue, LocalBlobStore(tmp_path), tiny_engine, max_attempts=2)
    generation = await queue.submit(submission(ALICE))
    for expected in (S.QUEUED, S.FAILED):
        async with database.session() as session:  # a worker claims it, then dies
            await claim_next(session, "dead-worker", LIMITS)
        assert await worker.recover() == [generation.id]
        async with database.session() as session:
            row = await get_generation(session, generation.id)
        assert row.status is expected
    assert row.error is not None and "stopped 2 times" in row.error


async def test_a_cancel_from_another_process_reaches_the_running_job(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    queue = EmbeddedQueue(database, LIMITS)
    elsewhere = EmbeddedQueue(database, LIMITS)  # e.g. `imagine cancel` in another process
    worker = EmbeddedWorker(queue, LocalBlobStore(tmp_path), tiny_engine)
    generation = await queue.submit(submission(ALICE, steps=200))
    stop = asyncio.Event()

    async def cancel_once_running() -> None:
        async for event in queue.events():
            if isinstance(event, JobStarted):
                flagged = await elsewhere.cancel(generation.id)
                assert flagged.status is S.RUNNING and flagged.cancel_requested_at is not None
            if isinstance(event, JobCancelled):
                stop.set()
                return

    listener = asyncio.create_task(cancel_once_running())
    await asyncio.sleep(0)
    await asyncio.wait_for(worker.run(stop), 60)
    await listener
    async with database.session() as session:
        assert (await get_generation(session, generation.id)).status is S.CANCELLED


async def test_a_worker_claims_only_jobs_for_its_model(database: Database) -> None:
    queue = EmbeddedQueue(database, LIMITS)
    other = submission(ALICE, "for sdxl")
    await queue.submit(
        Submission(other.kind, other.recipe.model_copy(update={"model": "sdxl"}), ALICE)
    )
    await queue.submit(submission(BOB, "for tiny"))
    async with database.session() as session:
        claimed = await claim_next(session, "w", LIMITS, model="tiny")
        assert claimed is not None and claimed.recipe.prompt == "for tiny"
        assert await claim_next(session, "w", LIMITS, model="tiny") is None
