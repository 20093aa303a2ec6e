"""The queue contract, one suite for every implementation.

``embedded-sqlite`` and ``embedded-postgresql``: rows claimed by an in-process
worker; ``procrastinate``: the scaled mode, rows carried by procrastinate jobs
in one queue per model. Each test drives only the contract (submit, cancel,
position, events) and a real worker on the tiny engine, and reads the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from bot.deployment import open_deployment
from generation.engine import Engine
from generation.jobs import TEST_FAULT_ENV
from generation.worker import Worker
from storage.database import Database
from storage.deployment import Deployment
from storage.events import JobCancelled, JobEvent, JobProgress, JobStarted, JobSucceeded
from storage.generations import Origin
from storage.models import Generation, GenerationKind, GenerationStatus, Guild
from storage.queue import JobQueue, Submission
from storage.recipe import Recipe
from storage.scheduling import Limits, QueueFull
from storage.settings import Settings
from tests.conftest import migrated_database

S = GenerationStatus
A, B, C, D = 101, 102, 103, 104
GUILD = 900
NOWHERE = Origin()
LIMITS = Limits(max_running_per_user=1, max_queued_per_user=20)


@dataclass
class Backend:
    """A deployment as production opens it, on a database the test made."""

    name: str
    deployment: Deployment
    another: Callable[[], contextlib.AbstractAsyncContextManager[Deployment]]  # another process

    @property
    def queue(self) -> JobQueue:
        return self.deployment.queue

    @property
    def database(self) -> Database:
        return self.deployment.database

    async def subscribe(self, handle: Callable[[JobEvent], Awaitable[None]]) -> asyncio.Task[None]:
        """Start handling events; on PostgreSQL, return once LISTEN is in place."""

        async def listen() -> None:
            async for event in self.deployment.events.subscribe():
                await handle(event)

        task = asyncio.create_task(listen())
        await asyncio.sleep(0.5 if self.deployment.mode == "scaled" else 0)
        return task


def deployment_settings(database: Database, tmp_path: Path, mode: str) -> Settings:
    url = database.url.render_as_string(hide_password=False)
    return Settings(
        data_dir=tmp_path / "data",
        database_url=url,
        mode=mode,  # type: ignore[arg-type]
        model="tiny",
        max_running_per_user=LIMITS.max_running_per_user,
        max_queued_per_user=LIMITS.max_queued_per_user,
        worker_heartbeat_seconds=0.5,
        max_batch=8,  # batching on in both modes: the fair order must hold all the same
    )


@contextlib.asynccontextmanager
async def open_backend(name: str, database: Database, tmp_path: Path) -> AsyncIterator[Backend]:
    mode = "scaled" if name == "procrastinate" else "embedded"
    settings = deployment_settings(database, tmp_path, mode)
    async with open_deployment(settings) as deployment:
        yield Backend(name, deployment, lambda: open_deployment(settings))


@pytest.fixture(params=["embedded-sqlite", "embedded-postgresql", "procrastinate"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind = request.param
    store = "sqlite" if kind == "embedded-sqlite" else "postgresql"
    async with (
        migrated_database(store, tmp_path, request) as database,
        open_backend(kind, database, tmp_path) as opened,
    ):
        yield opened


def submission(
    user: int, prompt: str = "a boat", steps: int = 1, model: str = "tiny"
) -> Submission:
    recipe = Recipe(
        model=model, prompt=prompt, seed=1, width=64, height=64, steps=steps, guidance=5.0
    )
    return Submission(GenerationKind.IMAGINE, recipe, user)


async def rows(database: Database) -> list[Generation]:
    async with database.session() as session:
        query = select(Generation).options(selectinload(Generation.images)).order_by(Generation.id)
        return list(await session.scalars(query))


async def work_until(
    backend: Backend,
    engine: Engine,
    done: Callable[[], Awaitable[bool]],
    within: float = 90,
    **options: Any,
) -> None:
    """Run one worker until ``done()`` holds, then stop it; ``options``: more of
    :meth:`Worker.for_deployment`'s keywords."""
    worker = Worker.for_deployment(backend.deployment, engine, name="w", **options)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(within):
            while not await done():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def all_finished(database: Database) -> Callable[[], Awaitable[bool]]:
    async def done() -> bool:
        return all(row.status in (S.SUCCEEDED, S.CANCELLED) for row in await rows(database))

    return done


def run_order(finished: list[Generation]) -> list[int]:
    started = sorted(
        (row for row in finished if row.started_at is not None),
        key=lambda row: row.started_at or row.queued_at,
    )
    return [row.requester_id for row in started]


async def test_a_later_user_runs_second_not_eleventh(
    backend: Backend, tiny_engine: Engine, tmp_path: Path
) -> None:
    for number in range(10):
        await backend.queue.submit(submission(A, f"a{number}"))
    await backend.queue.submit(submission(B))
    await work_until(backend, tiny_engine, all_finished(backend.database))
    assert run_order(await rows(backend.database)) == [A, B] + [A] * 9


async def test_three_users_take_turns(
    backend: Backend, tiny_engine: Engine, tmp_path: Path
) -> None:
    for user in (A, B, C):
        for _ in range(2):
            await backend.queue.submit(submission(user))
    await work_until(backend, tiny_engine, all_finished(backend.database))
    assert run_order(await rows(backend.database)) == [A, B, C, A, B, C]


async def test_a_run_is_recorded_with_its_timings_and_worker(
    backend: Backend, tiny_engine: Engine, tmp_path: Path
) -> None:
    generation = await backend.queue.submit(submission(A))
    assert generation.status is S.QUEUED
    await work_until(backend, tiny_engine, all_finished(backend.database))
    [row] = await rows(backend.database)
    assert row.status is S.SUCCEEDED and row.worker_name == "w" and row.images
    assert row.started_at is not None and row.finished_at is not None
    assert row.queued_at <= row.started_at <= row.finished_at


async def test_the_queued_limit_refuses_with_the_count(backend: Backend) -> None:
    backend.queue.limits = Limits(max_running_per_user=1, max_queued_per_user=2)
    await backend.queue.submit(submission(A))
    await backend.queue.submit(submission(A))
    refusal = r"2 of your jobs are already waiting.*most allowed here is 2"
    with pytest.raises(QueueFull, match=refusal):
        await backend.queue.submit(submission(A))
    await backend.queue.submit(submission(B))  # other users are not affected
    assert [row.requester_id for row in await rows(backend.database)] == [A, A, B]


async def test_submissions_at_once_never_pass_the_limits(backend: Backend) -> None:
    """A member's commands arriving together (a new member's first ones, then an existing
    member's) are counted one at a time: no two both take the last free place. The server's
    own limit holds the same way."""
    async with backend.database.session() as session:
        session.add(Guild(id=GUILD, max_queued_per_user=2))
    in_guild = Origin(guild_id=GUILD, channel_id=1)

    async def at_once(user: int, count: int, origin: Origin = NOWHERE) -> list[object]:
        return await asyncio.gather(
            *(
                backend.queue.submit(replace(submission(user, f"at once {n}"), origin=origin))
                for n in range(count)
            ),
            return_exceptions=True,
        )

    backend.queue.limits = Limits(max_running_per_user=1, max_queued_per_user=3)
    first = await at_once(A, 8)  # A is new: their row is made by one of these
    assert sum(isinstance(r, Generation) for r in first) == 3, first
    assert all(isinstance(r, Generation | QueueFull) for r in first), first
    again = await at_once(A, 4)  # all refused: A's three wait still
    assert all(isinstance(r, QueueFull) for r in again), again
    here = await at_once(B, 6, in_guild)
    assert sum(isinstance(r, Generation) for r in here) == 2, here
    assert all(isinstance(r, Generation | QueueFull) for r in here), here
    queued = [row.requester_id for row in await rows(backend.database)]
    assert sorted(queued) == [A, A, A, B, B]


def round_trips(database: Database) -> list[str]:
    """What ``database`` sends from now on: statements, and BEGIN/COMMIT/ROLLBACK where a
    transaction is open (outside one, as for autocommit reads, the driver sends none)."""
    sent: list[str] = []

    def statement(_connection: Any, _cursor: Any, text: str, *_: Any) -> None:
        sent.append(text.split(None, 1)[0])

    def transaction(name: str) -> Callable[..., None]:
        def record(connection: Any, *_: Any) -> None:
            if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                sent.append(name)

        return record

    engine = database.engine.sync_engine
    sqlalchemy.event.listen(engine, "before_cursor_execute", statement)
    for name in ("begin", "commit", "rollback"):
        sqlalchemy.event.listen(engine, name, transaction(name.upper()))
    return sent


async def test_a_submission_and_its_position_cost_few_round_trips(backend: Backend) -> None:
    """A member's /imagine in a server: one transaction (lock the member, count, insert);
    in the scaled mode the job's id is recorded on the row (procrastinate's own query that
    makes the job is on top), and the place in line is one statement."""
    await backend.queue.submit(submission(A))  # A is known, as most members are
    sent = round_trips(backend.database)
    in_guild = replace(submission(A), origin=Origin(guild_id=GUILD, channel_id=1))
    generation = await backend.queue.submit(in_guild)
    submitted = list(sent)
    assert submitted[:5] == ["BEGIN", "INSERT", "SELECT", "INSERT", "COMMIT"], submitted
    assert len(submitted) == (6 if backend.name == "procrastinate" else 5), submitted
    sent.clear()
    assert (await backend.queue.position(generation.id)).position == 2
    if backend.name == "procrastinate":
        assert sent == ["SELECT"]


async def test_positions_follow_the_fair_order_with_growing_waits(backend: Backend) -> None:
    ids = [(await backend.queue.submit(submission(user))).id for user in (A, A, A, B, C)]
    a1, a2, a3, b1, c1 = ids
    where = {i: await backend.queue.position(i) for i in ids}
    assert [where[i].position for i in (a1, b1, c1, a2, a3)] == [1, 2, 3, 4, 5]
    waits = [where[i].estimated_wait_seconds for i in (a1, b1, c1, a2, a3)]
    assert waits == sorted(waits) and waits[0] < waits[-1]
    assert all(where[i].status is S.QUEUED for i in ids)


async def test_a_cancelled_waiting_job_gives_its_turn_to_the_user_s_next(
    backend: Backend,
) -> None:
    """A's first job is cancelled while it waits: A's second takes its turn, ahead of
    users who came later, as if the first had never been queued. Twice, so a cancel
    repeated on the same job moves nothing more."""
    a1, a2 = [(await backend.queue.submit(submission(A))).id for _ in range(2)]
    b1 = (await backend.queue.submit(submission(B))).id
    for _ in range(2):
        assert (await backend.queue.cancel(a1)).status is S.CANCELLED
    c1, d1 = [(await backend.queue.submit(submission(user))).id for user in (C, D)]
    where = {i: (await backend.queue.position(i)).position for i in (a2, b1, c1, d1)}
    assert [where[i] for i in (a2, b1, c1, d1)] == [1, 2, 3, 4]


async def test_a_cancelled_queued_job_never_runs(
    backend: Backend, tiny_engine: Engine, tmp_path: Path
) -> None:
    events: list[JobEvent] = []

    async def record(event: JobEvent) -> None:
        events.append(event)

    listener = await backend.subscribe(record)
    doomed = await backend.queue.submit(submission(A, "doomed"))
    await backend.queue.submit(submission(B, "kept"))
    assert (await backend.queue.cancel(doomed.id)).status is S.CANCELLED
    assert (await backend.queue.position(doomed.id)).status is S.CANCELLED
    await work_until(backend, tiny_engine, all_finished(backend.database))
    listener.cancel()
    first, kept = await rows(backend.database)
    assert first.status is S.CANCELLED and first.started_at is None and not first.images
    assert kept.status is S.SUCCEEDED
    assert JobCancelled(generation_id=doomed.id).kind in [e.kind for e in events]
    assert doomed.id not in [e.generation_id for e in events if isinstance(e, JobStarted)]


async def test_the_worker_publishes_started_progress_and_succeeded(
    backend: Backend, tiny_engine: Engine, tmp_path: Path
) -> None:
    events: list[JobEvent] = []
    finished = asyncio.Event()

    async def record(event: JobEvent) -> None:
        events.append(event)
        if isinstance(event, JobSucceeded):
            finished.set()

    listener = await backend.subscribe(record)
    generation = await backend.queue.submit(submission(A, steps=3))

    async def done() -> bool:
        return finished.is_set()

    await work_until(backend, tiny_engine, done)
    listener.cancel()
    ours = [e for e in events if e.generation_id == generation.id]
    assert isinstance(ours[0], JobStarted) and ours[0].worker_name == "w"
    steps = [e.step for e in ours if isinstance(e, JobProgress) and e.preview is None]
    assert steps == [1, 2, 3]  # and a preview of step 2, from its own thread
    assert all(e.total == 3 for e in ours if isinstance(e, JobProgress))
    assert isinstance(ours[-1], JobSucceeded)
    [row] = await rows(backend.database)
    assert ours[-1].image_ids == [image.id for image in row.images]


@pytest.mark.parametrize("from_elsewhere", [False, True], ids=["same-queue", "other-process"])
async def test_cancelling_a_running_job_stops_it_within_a_step(
    backend: Backend, tiny_engine: Engine, tmp_path: Path, from_elsewhere: bool
) -> None:
    async with contextlib.AsyncExitStack() as elsewhere:
        canceller = backend.queue
        if from_elsewhere:
            canceller = (await elsewhere.enter_async_context(backend.another())).queue
        generation = await backend.queue.submit(submission(A, steps=200))
        after = await backend.queue.submit(submission(B, "runs next"))
        steps_at_cancel: list[int] = []
        steps: list[int] = []

        async def cancel_once_running(event: JobEvent) -> None:
            if isinstance(event, JobProgress) and event.generation_id == generation.id:
                steps.append(event.step)
                if event.step == 1:
                    flagged = await canceller.cancel(generation.id)
                    assert flagged.cancel_requested_at is not None
                    steps_at_cancel.append(event.step)

        listener = await backend.subscribe(cancel_once_running)
        try:
            await work_until(backend, tiny_engine, all_finished(backend.database))
        finally:
            listener.cancel()
    stopped, next_one = await rows(backend.database)
    assert stopped.status is S.CANCELLED and not stopped.images
    # In this process the token stops the next step; from another process PostgreSQL's
    # NOTIFY does the same, while on SQLite the worker polls the flag every half second.
    polled = from_elsewhere and backend.name == "embedded-sqlite"
    assert steps_at_cancel == [1] and max(steps) <= (40 if polled else 3)
    assert next_one.id == after.id and next_one.status is S.SUCCEEDED
    assert stopped.finished_at is not None and next_one.started_at is not None
    assert stopped.finished_at <= next_one.started_at  # the GPU was free before it started


async def test_a_worker_runs_only_jobs_for_its_model(
    backend: Backend, tiny_engine: Engine, tmp_path: Path
) -> None:
    other = await backend.queue.submit(submission(A, "for sdxl", model="tiny-sdxl"))
    mine = await backend.queue.submit(submission(B, "for tiny"))

    async def mine_done() -> bool:
        by_id = {row.id: row for row in await rows(backend.database)}
        return by_id[mine.id].status is S.SUCCEEDED

    await work_until(backend, tiny_engine, mine_done)
    await asyncio.sleep(0.5)
    by_id = {row.id: row for row in await rows(backend.database)}
    assert by_id[other.id].status is S.QUEUED and by_id[other.id].started_at is None
    assert (await backend.queue.position(other.id)).position == 1


async def test_a_worker_stops_claiming_after_too_many_failures_in_a_row(
    backend: Backend, tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_FAULT_ENV, "fail:broken")
    prompts = ["broken 1", "fine 1", "broken 2", "broken 3", "fine 2"]
    for prompt in prompts:
        await backend.queue.submit(submission(A, prompt))
    worker = Worker.for_deployment(
        backend.deployment, tiny_engine, name="w", max_consecutive_failures=2
    )
    # Never stopped from outside: the worker ends by itself after "broken 3".
    await asyncio.wait_for(worker.run(asyncio.Event()), timeout=90)
    found = [(row.recipe.prompt, row.status) for row in await rows(backend.database)]
    assert found == [
        ("broken 1", S.FAILED),
        ("fine 1", S.SUCCEEDED),
        ("broken 2", S.FAILED),
        ("broken 3", S.FAILED),
        ("fine 2", S.QUEUED),
    ]
    assert worker.gave_up is not None and "2 jobs in a row failed" in worker.gave_up
    metrics = worker.metrics.registry
    assert metrics.get_sample_value("imagine_worker_stopped") == 1
    assert metrics.get_sample_value("imagine_worker_failures_in_a_row") == 2
