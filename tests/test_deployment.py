"""One deployment object: the mode is chosen in one place, and the ports it hands out."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from bot.cli import main
from bot.deployment import open_deployment, resolve_mode
from storage.blobs import DatabaseBlobStore, LocalBlobStore
from storage.errors import ConfigError
from storage.events import LocalEventBus
from storage.generations import get_generation
from storage.models import GenerationKind
from storage.pg_events import PostgresEventBus
from storage.queue import RowJobs, RowQueue, Submission
from storage.recipe import Recipe
from storage.scaled_queue import ProcrastinateJobs, ProcrastinateQueue
from storage.scheduling import heartbeat
from storage.settings import Settings
from tests.conftest import migrated_database

ROOT = Path(__file__).resolve().parent.parent
RECIPE = Recipe(model="tiny", prompt="a boat", seed=1, width=64, height=64, steps=1, guidance=5)


def settings_for(url: URL, tmp_path: Path, **more: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=url.render_as_string(hide_password=False),
        model="tiny",
        **more,  # type: ignore[arg-type]
    )


async def test_sqlite_opens_the_embedded_mode(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", model="tiny")
    async with open_deployment(settings) as deployment:
        assert deployment.mode == "embedded" and deployment.bot_runs_worker
        assert isinstance(deployment.queue, RowQueue)
        assert isinstance(deployment.events, LocalEventBus)
        assert isinstance(deployment.jobs, RowJobs)
        assert isinstance(deployment.blobs, LocalBlobStore)
        # The queue wakes the worker's job source: they share one event.
        assert deployment.queue.wakeup is deployment.jobs.wakeup


async def test_postgresql_opens_the_scaled_mode(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with (
        migrated_database("postgresql", tmp_path, request) as database,
        open_deployment(settings_for(database.url, tmp_path)) as deployment,
    ):
        assert deployment.mode == "scaled" and not deployment.bot_runs_worker
        assert isinstance(deployment.queue, ProcrastinateQueue)
        assert isinstance(deployment.events, PostgresEventBus)
        assert isinstance(deployment.jobs, ProcrastinateJobs)
        assert isinstance(deployment.blobs, DatabaseBlobStore)
        generation = await deployment.queue.submit(Submission(GenerationKind.IMAGINE, RECIPE, 1))
        assert generation.job_id is not None  # procrastinate carries it


async def test_embedded_on_postgresql_is_one_process_without_procrastinate(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with (
        migrated_database("postgresql", tmp_path, request) as database,
        open_deployment(settings_for(database.url, tmp_path, mode="embedded")) as deployment,
    ):
        assert isinstance(deployment.queue, RowQueue)
        assert isinstance(deployment.events, LocalEventBus)
        assert deployment.cancel_listener is not None


def test_the_scaled_mode_on_sqlite_is_refused_with_what_to_do(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, model="tiny", mode="scaled")
    with pytest.raises(ConfigError, match=r"needs PostgreSQL.*IMAGINE_DATABASE_URL"):
        resolve_mode(settings)


def test_only_the_deployment_asks_which_mode_it_is() -> None:
    """The embedded/scaled choice is made in bot/deployment.py and nowhere else."""
    # (A Pillow image's mode is another mode: only the deployment's values count.)
    asking = re.compile(
        r"is_embedded|\.mode\s*[!=]=\s*[\"'](?:embedded|scaled|auto)|resolve_mode\(|"
        r"settings\.mode\b"
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for package in ("bot", "generation", "storage", "migrations")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.relative_to(ROOT).as_posix() not in {"bot/deployment.py", "storage/deployment.py"}
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if asking.search(line)
    ]
    assert offenders == []


async def test_status_says_when_no_worker_runs_the_model(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=clean_env, model="tiny")
    async with open_deployment(settings) as deployment:
        generation = await deployment.queue.submit(Submission(GenerationKind.IMAGINE, RECIPE, 1))
    assert await asyncio.to_thread(main, ["status", str(generation.id)]) == 0
    said = capsys.readouterr().out
    assert "no worker is running for tiny" in said and "to wait" not in said

    async with open_deployment(settings) as deployment:
        async with deployment.database.session() as session:
            await heartbeat(session, "gpu-1", "tiny")
            assert (await get_generation(session, generation.id)).model == "tiny"
        where = await deployment.queue.position(generation.id)
        assert where.workers == 1 and where.position == 1
    assert await asyncio.to_thread(main, ["status", str(generation.id)]) == 0
    said = capsys.readouterr().out
    assert "#1 in line, about" in said and "no worker" not in said


async def test_waits_divide_among_the_live_workers(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", model="tiny", max_queued_per_user=10)
    async with open_deployment(settings) as deployment:
        ids = [
            (await deployment.queue.submit(Submission(GenerationKind.IMAGINE, RECIPE, 1))).id
            for _ in range(5)
        ]
        async with deployment.database.session() as session:
            await heartbeat(session, "gpu-1", "tiny")
        one = await deployment.queue.position(ids[-1])
        async with deployment.database.session() as session:
            await heartbeat(session, "gpu-2", "tiny")
            await heartbeat(session, "sdxl-box", "sdxl")  # another model's worker
        two = await deployment.queue.position(ids[-1])
    assert (one.workers, two.workers) == (1, 2)
    assert two.estimated_wait_seconds == pytest.approx(one.estimated_wait_seconds / 2)
