"""``imagine backup`` and ``imagine restore``: taken while a worker runs, restored on a fresh
data folder or an empty PostgreSQL database, checked before anything is written."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.engine import URL

from bot.cli import main
from bot.deployment import open_deployment
from generation.engine import Engine
from generation.worker import Worker
from migrations import runner
from storage.blobs import DatabaseBlobStore, LocalBlobStore
from storage.database import Database
from storage.events import JobSucceeded
from storage.generations import NewImage, add_images, create_generation
from storage.models import Generation, GenerationKind, GenerationStatus
from storage.queue import Submission
from storage.recipe import Recipe
from storage.settings import Settings
from tests.conftest import migrated_database, new_database

S = GenerationStatus


def recipe(seed: int) -> Recipe:
    return Recipe(
        model="tiny", prompt=f"a boat {seed}", seed=seed, width=64, height=64, steps=2, guidance=5
    )


async def run(*args: str) -> int:
    """The command as a user runs it (it runs its own event loop, so on a thread)."""
    return await asyncio.to_thread(main, list(args))


def pixels(png: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def statuses_in(database_file: Path) -> dict[int, str]:
    with contextlib.closing(sqlite3.connect(database_file)) as connection:
        return dict(connection.execute("SELECT id, status FROM generations").fetchall())


async def test_a_backup_taken_while_a_worker_runs_restores_bit_for_bit(
    clean_env: Path,
    tmp_path: Path,
    tiny_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backup = tmp_path / "backup"
    settings = Settings(data_dir=clean_env, model="tiny")
    async with open_deployment(settings) as deployment:
        ids = [
            (await deployment.queue.submit(Submission(GenerationKind.IMAGINE, recipe(n), n))).id
            for n in range(1, 5)
        ]

        async def statuses() -> list[S]:
            async with deployment.database.session() as session:
                rows = await session.scalars(select(Generation.status).order_by(Generation.id))
                return list(rows)

        first, every = asyncio.Event(), asyncio.Event()

        async def count_successes() -> None:
            done = 0
            async for event in deployment.events.subscribe():
                done += isinstance(event, JobSucceeded)
                if done:
                    first.set()
                if done == len(ids):
                    every.set()

        counting = asyncio.create_task(count_successes())
        await asyncio.sleep(0)  # subscribed before the worker starts
        stop = asyncio.Event()
        worker = Worker.for_deployment(deployment, tiny_engine, name="w", heartbeat_seconds=60)
        working = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(first.wait(), 120)
        assert await run("backup", str(backup)) == 0  # the worker runs on meanwhile
        await asyncio.wait_for(every.wait(), 120)
        stop.set()
        counting.cancel()
        await working
        assert await statuses() == [S.SUCCEEDED] * 4
        source_blobs = deployment.blobs
    assert isinstance(source_blobs, LocalBlobStore)

    taken = statuses_in(backup / "database.sqlite3")
    finished = [i for i in ids if taken[i] == S.SUCCEEDED.value]
    assert finished and len(finished) < len(ids), taken  # taken with jobs still in line
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["counts"]["generations"] == 4 and manifest["missing_blobs"] == []
    # Four images, a grid and the web gallery's thumbnails each (the images are smaller
    # than both thumbnail sizes, so one WebP serves both).
    assert len(manifest["blobs"]) == len(finished) * 9
    capsys.readouterr()

    fresh = tmp_path / "fresh"
    monkeypatch.setenv("IMAGINE_DATA_DIR", str(fresh))
    assert await run("restore", str(backup)) == 0
    assert statuses_in(fresh / "imagine.db") == taken  # the jobs still in line included
    capsys.readouterr()
    for generation_id in finished:
        assert await run("show", str(generation_id)) == 0
        shown = capsys.readouterr().out.splitlines()
        files = [Path(line.split()[-1]) for line in shown if line.startswith("image ")]
        assert len(files) == 4 and all(file.is_relative_to(fresh) for file in files)
        for file in files:
            original = source_blobs.path_for(file.name).read_bytes()
            assert file.read_bytes() == original
            assert hashlib.sha256(original).hexdigest() == file.name

    # The restored recipe makes the restored pixels again.
    [restored] = [line for line in shown if line.startswith("recipe: ")]
    again = await asyncio.to_thread(tiny_engine.txt2img, Recipe.from_json(restored[8:]))
    for image, file in zip(again, files, strict=True):
        assert np.array_equal(pixels(image.png), pixels(file.read_bytes()))


async def _one_generation(database: Database, blobs: LocalBlobStore | DatabaseBlobStore) -> str:
    key = await blobs.put(b"\x89PNG not really, but bytes all the same")
    async with database.session() as session:
        generation = await create_generation(
            session, kind=GenerationKind.IMAGINE, recipe=recipe(9), requester_id=7
        )
        await add_images(session, generation.id, [NewImage(0, 9, 64, 64, key, key)])
    return key


async def test_restore_checks_the_backup_and_the_target_before_it_writes(
    clean_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(data_dir=clean_env, model="tiny")
    async with open_deployment(settings) as deployment:
        assert isinstance(deployment.blobs, LocalBlobStore)
        key = await _one_generation(deployment.database, deployment.blobs)
        source_blob = deployment.blobs.path_for(key)
    backup = tmp_path / "backup"
    good = source_blob.read_bytes()

    # A damaged blob in the blob folder is left out with a warning, not the whole backup;
    # the same image stored again (the worker makes it anew, say) replaces the bad file.
    source_blob.write_bytes(b"rot")
    damaged = tmp_path / "damaged"
    assert await run("backup", str(damaged)) == 0
    assert f"warning: blob {key} is missing from the blob folder, or damaged" in (
        capsys.readouterr().err
    )
    assert json.loads((damaged / "manifest.json").read_text())["missing_blobs"] == [key]
    assert not [path for path in (damaged / "blobs").rglob("*") if path.is_file()]
    async with open_deployment(settings) as deployment:
        assert await deployment.blobs.put(good) == key
    assert source_blob.read_bytes() == good
    shutil.rmtree(damaged)

    assert await run("backup", str(backup)) == 0
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob(".backup.partial-*")))
    capsys.readouterr()

    assert await run("backup", str(backup)) == 2
    assert "already exists; give a new folder name" in capsys.readouterr().err

    # The source is not empty: refused, and its data is untouched.
    before = (clean_env / "imagine.db").read_bytes()
    assert await run("restore", str(backup)) == 2
    said = capsys.readouterr().err
    assert f"what is already in the database {clean_env / 'imagine.db'}" in said
    assert "--force" in said
    assert (clean_env / "imagine.db").read_bytes() == before

    # An interrupted backup left no manifest: not taken for a backup.
    partial = tmp_path / ".backup.partial-1"
    partial.mkdir()
    assert await run("restore", str(partial)) == 2
    assert "is not a complete Imagine backup" in capsys.readouterr().err

    # A damaged blob is found before anything is written.
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("IMAGINE_DATA_DIR", str(fresh))
    blob = LocalBlobStore(backup / "blobs").path_for(key)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    assert await run("restore", str(backup)) == 2
    said = capsys.readouterr().err
    assert f"is damaged: blobs/{key[:2]}/{key[2:4]}/{key} does not have the sha256" in said
    assert not [path for path in fresh.rglob("*") if path.is_file()]

    # --force replaces a database that holds data.
    blob.write_bytes(b"\x89PNG not really, but bytes all the same")
    monkeypatch.setenv("IMAGINE_DATA_DIR", str(clean_env))
    async with open_deployment(settings) as deployment:
        await _one_generation(deployment.database, deployment.blobs)  # type: ignore[arg-type]
    assert await run("restore", str(backup), "--force") == 0
    assert len(statuses_in(clean_env / "imagine.db")) == 1


async def test_an_older_backup_is_migrated_forward_with_its_styles(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = runner.known_revisions()[-2]
    database = Database.from_settings(Settings(data_dir=clean_env))
    try:
        await runner.upgrade(database, old)
    finally:
        await database.dispose()
    style = b'name = "ink"\nlora = "ink.safetensors"\n'
    (clean_env / "styles").mkdir()
    (clean_env / "styles" / "ink.toml").write_bytes(style)
    backup = tmp_path / "backup"
    assert await run("backup", str(backup)) == 0
    assert json.loads((backup / "manifest.json").read_text())["revision"] == old

    monkeypatch.setenv("IMAGINE_DATA_DIR", str(tmp_path / "fresh"))
    assert await run("restore", str(backup)) == 0
    assert (tmp_path / "fresh" / "styles" / "ink.toml").read_bytes() == style
    with contextlib.closing(sqlite3.connect(tmp_path / "fresh" / "imagine.db")) as connection:
        [(revision,)] = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert revision == runner.head_revision()


async def test_postgresql_round_trip_with_blobs_in_the_database(
    clean_env: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def use(url: URL) -> None:
        monkeypatch.setenv("IMAGINE_DATABASE_URL", url.render_as_string(hide_password=False))

    backup = tmp_path / "backup"
    admin: URL = request.getfixturevalue("postgres_admin_url")
    async with migrated_database("postgresql", tmp_path, request) as source:
        key = await _one_generation(source, DatabaseBlobStore(source))
        use(source.url)
        assert await run("backup", str(backup)) == 0
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["blob_store"] == "database" and manifest["blobs"] == []
    assert manifest["counts"]["blobs"] == 1 and manifest["counts"]["images"] == 1

    async with new_database("postgresql", tmp_path, admin) as target_url:
        use(target_url)
        assert await run("restore", str(backup)) == 0
        target = Database(target_url)
        try:
            restored = await DatabaseBlobStore(target).get(key)
            async with target.session() as session:
                [generation] = await session.scalars(select(Generation))
        finally:
            await target.dispose()
        assert hashlib.sha256(restored).hexdigest() == key
        assert generation.recipe == recipe(9)

        capsys.readouterr()
        assert await run("restore", str(backup)) == 2
        assert "add --force" in capsys.readouterr().err
        assert await run("restore", str(backup), "--force") == 0


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_dump_pg_restore_cannot_read_leaves_the_database_as_it_was(
    database: Database, tmp_path: Path
) -> None:
    """--force drops what the database holds only once pg_restore has read the dump (an
    older pg_restore than the pg_dump that made it cannot)."""
    from storage.backup import BackupError
    from storage.restore import restore_postgres

    key = await _one_generation(database, DatabaseBlobStore(database))
    dump = tmp_path / "database.pgdump"
    dump.write_bytes(b"PGDMP\x01\x63\x00 a format from the future")
    with pytest.raises(BackupError, match="nothing in the database was changed"):
        await restore_postgres(dump, database.url, replace=True)
    async with database.session() as session:
        assert len(list(await session.scalars(select(Generation)))) == 1
    assert await DatabaseBlobStore(database).get(key)
