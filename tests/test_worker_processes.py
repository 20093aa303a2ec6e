"""Real `imagine worker` processes: a worker killed mid-job loses nothing, a job that
crashes worker after worker is given up, a worker whose jobs keep failing exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import URL

from storage.database import Database
from storage.generations import get_generation, mark_delivered
from storage.models import Generation, GenerationKind, GenerationStatus
from storage.queue import RowQueue, Submission
from storage.recipe import Recipe
from storage.scheduling import Limits, heartbeat, requeue_orphans
from tests.conftest import migrated_database
from tests.test_queue import recipe

S = GenerationStatus
IMAGINE = Path(sys.executable).parent / "imagine"


def start_worker(
    url: URL, name: str, data_dir: Path, *, stale_seconds: float = 3, **settings: str
) -> subprocess.Popen[str]:
    """``imagine worker --name name`` on the tiny model; ``settings``: more IMAGINE_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env |= {
        "IMAGINE_DATABASE_URL": url.render_as_string(hide_password=False),
        "IMAGINE_DATA_DIR": str(data_dir),
        "IMAGINE_MODEL": "tiny",
        "IMAGINE_WORKER_HEARTBEAT_SECONDS": "0.5",
        "IMAGINE_WORKER_STALE_SECONDS": str(stale_seconds),
        "IMAGINE_METRICS_PORT": "0",
        "HF_HUB_OFFLINE": "1",
    }
    env |= settings
    # A file, not a pipe: a worker that logs more than a pipe holds must not block. Appended
    # to, so that a restarted worker's log follows its predecessor's.
    log = (data_dir / f"{name}.log").open("a")
    return subprocess.Popen(
        [str(IMAGINE), "worker", "--name", name],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )


async def statuses(database: Database) -> dict[int, tuple[GenerationStatus, str | None]]:
    async with database.session() as session:
        rows = await session.execute(
            select(Generation.id, Generation.status, Generation.worker_name)
        )
        return {row.id: (row.status, row.worker_name) for row in rows}


async def submit_lighthouses(database: Database, steps: int) -> list[int]:
    """Four users' jobs of two images each, on the same settings (one batch of 8 can hold
    them all); their ids."""
    queue = RowQueue(database, Limits(max_running_per_user=1, max_queued_per_user=10))
    lighthouse = recipe("a lighthouse", steps)
    lighthouse = lighthouse.model_copy(update={"seed": 3, "width": 96, "height": 96, "count": 2})
    return [
        (await queue.submit(Submission(GenerationKind.IMAGINE, lighthouse, user))).id
        for user in (1, 2, 3, 4)
    ]


async def all_succeeded(database: Database, deadline: float) -> bool:
    """Wait until every job succeeded (True) or ``deadline`` passed (False)."""
    while time.monotonic() < deadline:
        current = await statuses(database)
        if all(status is S.SUCCEEDED for status, _ in current.values()):
            return True
        await asyncio.sleep(0.25)
    return False


def stop_all(*processes: subprocess.Popen[str] | None) -> None:
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        if process is not None:
            process.wait(timeout=60)


async def check_delivered_once(database: Database, jobs: list[int]) -> None:
    """Each job has its two images, and a bot delivering each result gets it once."""
    async with database.session() as session:
        for generation_id in jobs:
            generation = await get_generation(session, generation_id)
            assert [image.index for image in generation.images] == [0, 1]
    for generation_id in jobs:
        async with database.session() as session:
            assert await mark_delivered(session, generation_id) is True
        async with database.session() as session:
            assert await mark_delivered(session, generation_id) is False


async def test_a_sigkilled_worker_s_job_runs_again_elsewhere_exactly_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with migrated_database("postgresql", tmp_path, request) as database:
        jobs = await submit_lighthouses(database, steps=20)
        # Each job alone (its two images fill a batch): a batch killed is the next test's.
        doomed = start_worker(database.url, "doomed", tmp_path, IMAGINE_MAX_BATCH="2")
        survivor = start_worker(database.url, "survivor", tmp_path, IMAGINE_MAX_BATCH="2")
        try:
            deadline = time.monotonic() + 120
            victim = None
            while victim is None and time.monotonic() < deadline:
                for generation_id, (status, worker) in (await statuses(database)).items():
                    if status is S.RUNNING and worker == "doomed":
                        victim = generation_id
                await asyncio.sleep(0.1)
            assert victim is not None, "the first worker never started a job"
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=30)
            if not await all_succeeded(database, deadline):
                log = (tmp_path / "survivor.log").read_text()[-3000:]
                pytest.fail(f"not every job finished: {await statuses(database)}\n{log}")
        finally:
            stop_all(doomed, survivor)
        survivor_log = (tmp_path / "survivor.log").read_text()
        assert survivor.returncode == 0, survivor_log
        assert doomed.returncode == -signal.SIGKILL

        async with database.session() as session:
            again = await get_generation(session, victim)
            assert again.worker_name == "survivor" and again.attempts == 2
        await check_delivered_once(database, jobs)


async def test_a_batch_of_a_sigkilled_worker_runs_again_each_job_exactly_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with migrated_database("postgresql", tmp_path, request) as database:
        jobs = await submit_lighthouses(database, steps=12)
        doomed = start_worker(database.url, "doomed", tmp_path)  # IMAGINE_MAX_BATCH: 8
        survivor = None
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                current = await statuses(database)
                if set(current.values()) == {(S.RUNNING, "doomed")}:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the worker never ran the four jobs at once: {current}")
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=30)
            survivor = start_worker(database.url, "survivor", tmp_path)
            if not await all_succeeded(database, deadline):
                log = (tmp_path / "survivor.log").read_text()[-3000:]
                pytest.fail(f"not every job finished: {await statuses(database)}\n{log}")
        finally:
            stop_all(doomed, survivor)
        assert survivor is not None
        survivor_log = (tmp_path / "survivor.log").read_text()
        assert survivor.returncode == 0, survivor_log
        assert doomed.returncode == -signal.SIGKILL
        # Each alone: any of them may have been what killed the worker (storage.scheduling's
        # ran_before), so none takes the others down a second time.
        assert survivor_log.count("in a batch of 1") == 4, survivor_log

        async with database.session() as session:
            for generation_id in jobs:  # started by the killed worker, then once more
                generation = await get_generation(session, generation_id)
                assert generation.worker_name == "survivor" and generation.attempts == 2
            # Each row's procrastinate job was started twice and succeeded once.
            events = (
                await session.execute(
                    text(
                        "SELECT j.args->>'generation_id' AS generation_id, e.type::text AS kind, "
                        "count(*) AS times FROM procrastinate_events e "
                        "JOIN procrastinate_jobs j ON j.id = e.job_id "
                        "WHERE e.type IN ('started', 'succeeded') GROUP BY 1, 2"
                    )
                )
            ).all()
        assert sorted((int(row.generation_id), row.kind, row.times) for row in events) == [
            (generation_id, kind, times)
            for generation_id in jobs
            for kind, times in (("started", 2), ("succeeded", 1))
        ]
        await check_delivered_once(database, jobs)


async def test_jobs_of_live_workers_are_left_alone(database: Database) -> None:
    queue = RowQueue(database, Limits(max_running_per_user=1, max_queued_per_user=10))
    recipe = Recipe(model="tiny", prompt="p", seed=1, width=64, height=64, steps=1, guidance=1)
    generation = await queue.submit(Submission(GenerationKind.IMAGINE, recipe, 1))
    async with database.session() as session:
        await heartbeat(session, "alive", "tiny")
        from storage.scheduling import claim_next

        await claim_next(session, "alive", queue.limits)
    async with database.session() as session:
        assert await requeue_orphans(session, 3) == []
    async with database.session() as session:  # later: the worker has gone quiet
        taken = await requeue_orphans(session, 3, stale_after=timedelta(seconds=-1))
        assert taken == [generation.id]


def small_job(prompt: str, requester: int) -> Submission:
    recipe = Recipe(
        model="tiny", prompt=prompt, seed=5, width=64, height=64, steps=2, guidance=5.0, count=2
    )
    return Submission(GenerationKind.IMAGINE, recipe, requester)


async def test_a_job_that_crashes_every_worker_is_given_up_and_the_next_runs_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with migrated_database("postgresql", tmp_path, request) as database:
        queue = RowQueue(database, Limits(max_running_per_user=1, max_queued_per_user=10))
        poison = (await queue.submit(small_job("a poison pill", 1))).id
        good = (await queue.submit(small_job("a lighthouse", 2))).id
        crash = {"IMAGINE_TEST_FAULT": "crash:poison", "IMAGINE_MAX_ATTEMPTS": "2"}
        exits: list[int] = []
        worker = start_worker(database.url, "gpu0", tmp_path, **crash)
        try:
            deadline = time.monotonic() + 240  # three worker starts on a busy CI machine
            while time.monotonic() < deadline:
                if worker.poll() is not None:  # restarted, as systemd or Docker would
                    exits.append(worker.returncode)
                    worker = start_worker(database.url, "gpu0", tmp_path, **crash)
                current = await statuses(database)
                if current[poison][0].is_final and current[good][0].is_final:
                    break
                await asyncio.sleep(0.2)
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        log = (tmp_path / "gpu0.log").read_text()[-3000:]
        assert exits == [-signal.SIGSEGV, -signal.SIGSEGV], log
        # The worker that recorded the failure runs on, and stops cleanly when asked.
        assert worker.returncode == 0, log

        async with database.session() as session:
            given_up = await get_generation(session, poison)
            assert given_up.status is S.FAILED and given_up.attempts == 2
            assert given_up.error == (
                "This job crashed the worker 2 times and was stopped; try different settings."
            )
            ran = await get_generation(session, good)
            # It shared the poison job's first batch and went down with it; then each ran
            # alone (a job that ran before never joins a batch), so it crashed nothing more.
            assert ran.status is S.SUCCEEDED and ran.attempts == 2
            assert [image.index for image in ran.images] == [0, 1]
        for generation_id in (poison, good):  # each outcome is delivered once
            async with database.session() as session:
                assert await mark_delivered(session, generation_id) is True
            async with database.session() as session:
                assert await mark_delivered(session, generation_id) is False


async def test_a_worker_whose_jobs_keep_failing_exits_for_its_supervisor(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with migrated_database("sqlite", tmp_path, request) as database:
        queue = RowQueue(database, Limits(max_running_per_user=1, max_queued_per_user=10))
        jobs = [(await queue.submit(small_job(f"broken {n}", 1))).id for n in range(3)]
        worker = start_worker(
            database.url,
            "flaky",
            tmp_path,
            IMAGINE_TEST_FAULT="fail:broken",
            IMAGINE_MAX_CONSECUTIVE_FAILURES="2",
        )
        try:
            returncode = await asyncio.to_thread(worker.wait, 120)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        log = (tmp_path / "flaky.log").read_text()
        assert returncode == 3, log[-3000:]
        assert "stopping: 2 jobs in a row failed on worker flaky" in log
        assert "worker flaky exits with code 3" in log
        current = await statuses(database)
        assert [current[job][0] for job in jobs] == [S.FAILED, S.FAILED, S.QUEUED]
