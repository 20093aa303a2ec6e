"""The embedded queue's own parts on SQLite and PostgreSQL: the fair claim, limits, recovery.

What every queue must do is in test_queue_contract.py.
"""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from generation.engine import Engine
from generation.worker import Worker
from storage.blobs import LocalBlobStore
from storage.controls import ControlRef
from storage.database import Database
from storage.errors import IllegalTransition
from storage.events import (
    JobCancelled,
    JobEvent,
    JobFailed,
    JobProgress,
    JobSucceeded,
    LocalEventBus,
)
from storage.generations import get_generation, transition
from storage.models import Generation, GenerationKind, GenerationStatus, Image
from storage.queue import Cancellations, RowJobs, RowQueue, Submission
from storage.recipe import ImageRef, Outpaint, Recipe
from storage.results import record_success
from storage.scheduling import (
    Limits,
    claim_batch,
    claim_next,
    heartbeat,
    live_workers,
    requeue_orphans,
)

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


async def test_a_cancel_that_crosses_a_claim_stops_the_running_job(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker claims the job between /cancel's read of it (queued) and its write: the
    job is running then, so it is flagged and its worker stopped, not marked cancelled
    while the worker runs it to the end and has its result refused."""
    import storage.generations as generations

    cancellations = Cancellations()
    queue = RowQueue(database, LIMITS, cancellations=cancellations)
    job = await queue.submit(submission(ALICE, "raced"))
    stopped: list[int] = []
    read = generations.get_generation

    async def read_then_claimed(session: AsyncSession, generation_id: int) -> Generation:
        found = await read(session, generation_id)
        if not stopped and found.status is S.QUEUED:  # the claim lands after this read
            async with database.session() as other:
                assert await claim_next(other, "w", LIMITS) is not None
            cancellations.register(generation_id, lambda: stopped.append(generation_id))
        return found

    monkeypatch.setattr(generations, "get_generation", read_then_claimed)
    cancelled = await queue.cancel(job.id)
    monkeypatch.undo()
    assert cancelled.status is S.RUNNING and cancelled.worker_name == "w"
    assert stopped == [job.id]  # the worker's run is stopped where it runs
    async with database.session() as session:
        assert (await get_generation(session, job.id)).cancel_requested_at is not None


@pytest.mark.parametrize("backend", ["postgresql"])  # one clock per machine: the server's
async def test_a_worker_whose_clock_is_behind_is_not_taken_for_dead(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers on several machines share PostgreSQL: their heartbeats are timed by the
    server's clock, so one whose own clock runs 40 s behind keeps its running job and
    counts as live."""
    import storage.scheduling as scheduling

    queue = RowQueue(database, LIMITS)
    job = await queue.submit(submission(ALICE))
    real = scheduling.utcnow
    monkeypatch.setattr(scheduling, "utcnow", lambda: real() - timedelta(seconds=40))
    async with database.session() as session:  # on the slow machine
        await heartbeat(session, "slow", "tiny")
        assert await claim_next(session, "slow", LIMITS) is not None
    monkeypatch.undo()
    async with database.session() as session:  # another machine's sweep
        assert await requeue_orphans(session, 3, stale_after=timedelta(seconds=30)) == []
        assert await live_workers(session, "tiny", timedelta(seconds=30)) == 1
        assert (await get_generation(session, job.id)).worker_name == "slow"


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


async def test_a_claim_lost_to_another_worker_reads_the_order_again(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker claims the row this one read as next: the order is read again, where
    that claim has brought its user to the running limit, so their next job must wait."""
    import storage.scheduling as scheduling

    queue = RowQueue(database, LIMITS)
    first = await queue.submit(submission(ALICE, "a0"))
    await queue.submit(submission(ALICE, "a1"))
    real_transition = scheduling.transition
    claims: list[int] = []

    async def outrun(session: AsyncSession, generation_id: int, *args: Any, **kw: Any) -> Any:
        claims.append(generation_id)
        if len(claims) == 1:  # w1 commits its claim between w2's read and w2's claim
            async with database.session() as other:
                await real_transition(other, generation_id, S.RUNNING, worker_name="w1")
        return await real_transition(session, generation_id, *args, **kw)

    monkeypatch.setattr(scheduling, "transition", outrun)
    async with database.session() as session:
        assert await claim_next(session, "w2", LIMITS) is None  # a1 waits for a0
    assert claims == [first.id]
    async with database.session() as session:
        running = await session.scalars(select(Generation.id).where(Generation.status == S.RUNNING))
        assert list(running) == [first.id]


async def test_only_the_worker_holding_a_running_row_moves_it(database: Database) -> None:
    """A worker taken for dead (its database went away longer than the stale time) whose
    row was re-queued and claimed by another neither ends nor re-queues that row, and a
    sweep that read the row as the dead worker's cannot undo the new claim."""
    queue = RowQueue(database, LIMITS)
    job = await queue.submit(submission(ALICE))
    async with database.session() as session:
        await claim_next(session, "slow", LIMITS)  # it never beats: taken for dead
    async with database.session() as session:
        assert await requeue_orphans(session, 3, stale_after=timedelta(0)) == [job.id]
    async with database.session() as session:
        await claim_next(session, "fresh", LIMITS)
    for target in (S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED):
        with pytest.raises(IllegalTransition, match="is running on worker fresh and cannot"):
            async with database.session() as session:
                await transition(session, job.id, target, owner="slow")
    with pytest.raises(IllegalTransition, match="running on worker fresh"):
        await record_success(database, job.id, [], [], None, job.recipe, owner="slow")
    async with database.session() as session:
        row = await get_generation(session, job.id)
        assert (row.status, row.worker_name, row.attempts) == (S.RUNNING, "fresh", 2)
        done = await transition(session, job.id, S.SUCCEEDED, owner="fresh")
    assert done.status is S.SUCCEEDED


async def test_a_worker_taken_for_dead_drops_its_result_and_the_job_runs_again(
    database: Database,
    tiny_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the engine runs, a sweep re-queues the job (as after a database outage longer
    than the stale time): the worker's result is not the row's any more. It is dropped,
    not recorded as the job's failure, and the job runs again and succeeds."""
    queue = RowQueue(database, LIMITS)
    job = await queue.submit(submission(ALICE))
    worker = worker_on(database, tiny_engine, tmp_path, 1)
    loop = asyncio.get_running_loop()
    real_txt2img = tiny_engine.txt2img
    swept: list[int] = []

    async def sweep() -> None:
        async with database.session() as session:
            swept.extend(await requeue_orphans(session, 3, stale_after=timedelta(0)))

    def txt2img(*args: Any, **kwargs: Any) -> Any:  # on the engine's thread
        if not swept:
            asyncio.run_coroutine_threadsafe(sweep(), loop).result(timeout=30)
        return real_txt2img(*args, **kwargs)

    monkeypatch.setattr(tiny_engine, "txt2img", txt2img)
    finals: list[JobEvent] = []

    async def listen() -> None:
        async for event in worker.events.subscribe():
            if isinstance(event, JobSucceeded | JobFailed | JobCancelled):
                finals.append(event)

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0)
    try:
        await run_until_finished(worker, database)
        await asyncio.sleep(0.1)  # an announcement of the dropped result would arrive meanwhile
    finally:
        listener.cancel()
    assert swept == [job.id]
    async with database.session() as session:
        row = await get_generation(session, job.id)
    assert (row.status, row.attempts, row.error) == (S.SUCCEEDED, 2, None)
    assert [type(event) for event in finals] == [JobSucceeded]
    assert worker.failures_in_a_row == 0
    assert f"generation {job.id} is no longer this worker's" in caplog.text


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


async def claim_batches(database: Database, max_images: int) -> list[list[str]]:
    """Claim and finish batches, as one worker would; returns their prompts."""
    batches: list[list[str]] = []
    while True:
        async with database.session() as session:
            batch = await claim_batch(session, "w", LIMITS, "tiny", max_images)
            for generation in batch:
                await transition(session, generation.id, S.SUCCEEDED)
        if not batch:
            return batches
        batches.append([generation.recipe.prompt for generation in batch])


@pytest.mark.parametrize(
    ("max_images", "expected"),
    [
        (8, [["a0"], ["b0"], ["c0", "a1", "a2"]]),
        (2, [["a0"], ["b0"], ["c0", "a1"], ["a2"]]),
        (1, [["a0"], ["b0"], ["c0"], ["a1"], ["a2"]]),
    ],
)
async def test_a_batch_is_the_compatible_start_of_the_fair_order(
    database: Database, max_images: int, expected: list[list[str]]
) -> None:
    queue = RowQueue(database, LIMITS)
    for requester, prompt, steps in [
        (ALICE, "a0", 1),
        (ALICE, "a1", 1),
        (ALICE, "a2", 1),
        (BOB, "b0", 2),  # another step count: it cannot share a0's call
        (CAROL, "c0", 1),
    ]:
        await queue.submit(submission(requester, prompt, steps))
    # One at a time the order is a0 b0 c0 a1 a2: c0 fits a0's batch but would overtake b0.
    assert await claim_batches(database, max_images) == expected


KEY = "0" * 64
ALONE = {  # what a batched call would have to prove identical: each such job runs alone
    "variation": (GenerationKind.VARIATION, {"source_image_id": 1, "strength": 0.5}),
    "image prompt": (
        GenerationKind.IMAGINE,
        {
            "init_image": ImageRef(blob_key=KEY, sha256=KEY, width=64, height=64),
            "image_weight": 1.0,
            "strength": 0.7,
        },
    ),
    "control": (GenerationKind.IMAGINE, {"controls": (ControlRef(type="canny", map_key=KEY),)}),
    "zoom": (
        GenerationKind.OUTPAINT,
        {"source_image_id": 1, "outpaint": Outpaint(left=8, top=0, right=8, bottom=0)},
    ),
}


@pytest.mark.parametrize("what", list(ALONE))
async def test_jobs_from_an_image_or_with_controls_run_alone(database: Database, what: str) -> None:
    kind, inputs = ALONE[what]
    queue = RowQueue(database, LIMITS)
    for requester in (ALICE, BOB):
        one = recipe(f"{what} {requester}").model_copy(update=inputs)
        await queue.submit(Submission(kind, one, requester))
    await queue.submit(submission(CAROL, "plain"))
    assert await claim_batches(database, 8) == [[f"{what} 1"], [f"{what} 2"], ["plain"]]


async def test_jobs_that_ran_before_run_alone(database: Database) -> None:
    queue = RowQueue(database, LIMITS)
    for requester in (ALICE, BOB, CAROL):
        await queue.submit(submission(requester, f"job {requester}"))
    async with database.session() as session:
        crashed = await claim_batch(session, "w", LIMITS, "tiny", 8)
        assert len(crashed) == 3  # one batch, whose worker then dies
        for generation in crashed[:2]:  # re-queued, as requeue_orphans does
            await transition(session, generation.id, S.QUEUED)
    await transition_after(database, crashed[2].id, S.SUCCEEDED)  # it had finished
    # Either may be the job that crashed the worker: each runs alone; new jobs batch again.
    assert await claim_batches(database, 8) == [["job 1"], ["job 2"]]
    await queue.submit(submission(ALICE, "fresh 1"))
    await queue.submit(submission(BOB, "fresh 2"))
    assert await claim_batches(database, 8) == [["fresh 1", "fresh 2"]]


async def transition_after(database: Database, generation_id: int, target: S) -> None:
    async with database.session() as session:
        await transition(session, generation_id, target)


def worker_on(database: Database, engine: Engine, tmp_path: Path, max_batch: int) -> Worker:
    return Worker(
        database,
        LocalBlobStore(tmp_path / "blobs"),
        engine,
        jobs=RowJobs(database, LIMITS, max_batch=max_batch),
        events=LocalEventBus(),
        cancellations=Cancellations(),
    )


async def run_until_finished(worker: Worker, database: Database) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(60):
            while True:
                async with database.session() as session:
                    statuses = list(await session.scalars(select(Generation.status)))
                if all(status in (S.SUCCEEDED, S.CANCELLED) for status in statuses):
                    break
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def images_of(session: AsyncSession, generation_id: int) -> list[Image]:
    query = select(Image).where(Image.generation_id == generation_id).order_by(Image.index)
    return list(await session.scalars(query))


def pixels(image: PILImage.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("max_batch", [8, 1])
async def test_a_batched_worker_gives_each_job_the_images_it_gets_alone(
    database: Database,
    tiny_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pipeline_calls: list[int],
    max_batch: int,
) -> None:
    queue = RowQueue(database, LIMITS)
    recipes = [
        recipe("a lighthouse").model_copy(update={"count": 2, "seed": 5}),
        recipe("a red bicycle").model_copy(update={"seed": 9}),
        recipe("a harbour").model_copy(update={"count": 3, "seed": 1}),
    ]
    for requester, one in zip((ALICE, BOB, CAROL), recipes, strict=True):
        await queue.submit(Submission(GenerationKind.IMAGINE, one, requester))
    worker = worker_on(database, tiny_engine, tmp_path, max_batch)
    finals: list[JobEvent] = []
    all_announced = asyncio.Event()

    async def listen() -> None:
        async for event in worker.events.subscribe():
            if isinstance(event, JobSucceeded | JobFailed | JobCancelled):
                finals.append(event)
                if len(finals) == len(recipes):
                    all_announced.set()

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0)
    try:
        await run_until_finished(worker, database)  # stopping, it stores the last ones first
        await asyncio.wait_for(all_announced.wait(), 10)
        await asyncio.sleep(0.1)  # a second announcement would arrive meanwhile
    finally:
        listener.cancel()
    assert pipeline_calls == ([6] if max_batch == 8 else [2, 1, 3])
    # Each job of the batch stored in the background and announced once, with its images.
    assert sorted((e.generation_id, len(e.image_ids)) for e in finals) == [(1, 2), (2, 1), (3, 3)]
    monkeypatch.undo()
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with database.session() as session:
        for generation_id, one in enumerate(recipes, start=1):
            row = await get_generation(session, generation_id)
            assert row.status is S.SUCCEEDED
            stored = await images_of(session, generation_id)
            alone = tiny_engine.txt2img(one)
            assert len(stored) == len(alone) == one.count
            for image, expected in zip(stored, alone, strict=True):
                got = PILImage.open(io.BytesIO(await blobs.get(image.blob_key)))
                difference = np.abs(pixels(got) - pixels(expected.image)).max()
                assert difference <= 1  # 1/255: batched matmuls may round differently


async def test_cancelling_one_job_of_a_batch_keeps_the_others(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    worker = worker_on(database, tiny_engine, tmp_path, 8)
    queue = RowQueue(database, LIMITS, worker.events, worker.cancellations)
    doomed = await queue.submit(submission(ALICE, "doomed", steps=12))
    kept = await queue.submit(submission(BOB, "kept", steps=12))
    steps: dict[int, list[int]] = {doomed.id: [], kept.id: []}

    async def cancel_at_the_first_step() -> None:
        async for event in worker.events.subscribe():
            if isinstance(event, JobProgress) and event.preview is None:
                steps[event.generation_id].append(event.step)
                if event.generation_id == doomed.id and event.step == 1:
                    await queue.cancel(doomed.id)

    listener = asyncio.create_task(cancel_at_the_first_step())
    await asyncio.sleep(0)
    try:
        await run_until_finished(worker, database)
    finally:
        listener.cancel()
    async with database.session() as session:
        stopped, finished = [await get_generation(session, i) for i in (doomed.id, kept.id)]
        assert stopped.status is S.CANCELLED and not await images_of(session, doomed.id)
        assert finished.status is S.SUCCEEDED and len(await images_of(session, kept.id)) == 1
    assert stopped.started_at is not None and finished.started_at is not None
    assert abs(stopped.started_at - finished.started_at).total_seconds() < 1  # one batch
    assert steps[kept.id] == list(range(1, 13)) and steps[doomed.id] == [1]


async def test_a_local_subscription_keeps_what_is_published_before_it_is_read() -> None:
    """The bot subscribes, sweeps for finished generations, then reads: a result finished
    during the sweep must still reach it."""
    bus = LocalEventBus()
    events = bus.subscribe()
    finished = JobSucceeded(generation_id=7, image_ids=[1])
    bus.publish(finished)
    assert await asyncio.wait_for(anext(events), 5) == finished
    await events.aclose()
    bus.publish(JobSucceeded(generation_id=8, image_ids=[2]))  # to no one: unsubscribed
    unread = bus.subscribe()
    await unread.aclose()  # closed before any read: unsubscribed all the same
    assert bus._subscribers == []
    reading = bus.subscribe()
    waiting = asyncio.ensure_future(anext(reading))
    await asyncio.sleep(0)
    waiting.cancel()  # a reader that stops, as the bot's delivery task at shutdown
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert bus._subscribers == []
