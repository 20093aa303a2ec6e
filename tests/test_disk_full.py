"""A full disk fails the job in hand with a sentence, leaves no partial file and no row
pointing at a missing image, and the worker goes on once there is room again.

The disk is real: a small tmpfs mounted for the test (which needs root; elsewhere the
tests say so and skip).
"""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from sqlalchemy import make_url, select, text

from bot.cli.doctor import LOW_DISK_BYTES, check_disk
from generation.engine import Engine
from generation.worker import Worker
from storage.blobs import DatabaseBlobStore, LocalBlobStore
from storage.database import Database
from storage.errors import BlobStoreFull
from storage.events import LocalEventBus
from storage.generations import get_generation
from storage.models import Generation, GenerationKind, GenerationStatus, Image
from storage.queue import Cancellations, RowJobs, RowQueue, Submission
from storage.recipe import Recipe
from storage.scheduling import Limits
from storage.settings import Settings
from tests.conftest import migrated_database

S = GenerationStatus
FULL = "The image store is full; ask the bot's owner to free space."
LIMITS = Limits(max_running_per_user=1, max_queued_per_user=10)


@contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the test, unmounted after it."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"a full disk is a tmpfs mount here, which needs root: {mounted.stderr}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` with one file, then give back ``leave`` bytes; returns the file."""
    filler = disk / "filler"
    chunk = b"\xff" * 65536
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # Give room back in whole pages (tmpfs allocates pages), rounding down.
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def leftovers(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.startswith(".tmp-")]


async def test_a_full_folder_store_says_so_and_keeps_no_partial_file(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        store = LocalBlobStore(disk / "blobs")
        filler = fill(disk, leave=64 * 1024)
        with pytest.raises(BlobStoreFull) as raised:
            await store.put(os.urandom(256 * 1024))
        assert str(raised.value) == FULL
        assert leftovers(disk) == []
        filler.unlink()
        key = await store.put(b"room again")
        assert await store.get(key) == b"room again"


def test_a_style_s_lora_copied_onto_a_full_disk_leaves_no_partial_file(tmp_path: Path) -> None:
    from generation.jobs import _write_atomically

    with small_disk(tmp_path / "disk", "1m") as disk:
        filler = fill(disk, leave=64 * 1024)
        with pytest.raises(OSError) as raised:
            _write_atomically(disk / "loras" / "style.safetensors", os.urandom(256 * 1024))
        assert raised.value.errno == errno.ENOSPC
        assert list((disk / "loras").iterdir()) == []
        filler.unlink()


async def test_a_full_sqlite_database_store_says_so(tmp_path: Path) -> None:
    from migrations import runner

    with small_disk(tmp_path / "disk", "4m") as disk:
        database = Database(make_url(f"sqlite+aiosqlite:///{disk / 'imagine.db'}"))
        try:
            await runner.upgrade(database)
            store = DatabaseBlobStore(database)
            filler = fill(disk, leave=64 * 1024)
            with pytest.raises(BlobStoreFull):
                await store.put(os.urandom(512 * 1024))
            filler.unlink()
            key = await store.put(os.urandom(512 * 1024))
            assert await store.exists(key)
        finally:
            await database.dispose()


def recipe(prompt: str, seed: int) -> Recipe:
    return Recipe(
        model="tiny",
        prompt=prompt,
        seed=seed,
        width=64,
        height=64,
        steps=2,
        guidance=5.0,
        count=2,
    )


async def finished(database: Database, generation_id: int) -> Generation:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with database.session() as session:
            generation = await get_generation(session, generation_id)
        if generation.status.is_final:
            return generation
        await asyncio.sleep(0.05)
    raise AssertionError(f"generation {generation_id} never finished")


async def test_a_worker_fails_the_job_a_full_disk_stops_and_runs_the_next(
    tmp_path: Path, request: pytest.FixtureRequest, tiny_engine: Engine
) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        blobs = LocalBlobStore(disk / "blobs")
        async with migrated_database("sqlite", tmp_path, request) as database:
            queue = RowQueue(database, LIMITS)
            worker = Worker(
                database,
                blobs,
                tiny_engine,
                jobs=RowJobs(database, LIMITS, wakeup=queue.wakeup),
                events=LocalEventBus(),
                cancellations=Cancellations(),
            )

            async def submit(prompt: str, seed: int) -> Generation:
                job = Submission(GenerationKind.IMAGINE, recipe(prompt, seed), requester_id=1)
                return await finished(database, (await queue.submit(job)).id)

            stop = asyncio.Event()
            running = asyncio.create_task(worker.run(stop))
            try:
                # Room for a 64×64 image or two (at most 12 KB each), not for the grid.
                filler = fill(disk, leave=24 * 1024)
                full = await submit("a harbour", 2)
                assert full.status is S.FAILED and full.error == FULL
                assert full.images == [] and full.grid_blob_key is None
                assert leftovers(disk) == []
                written = [path for path in blobs.root.rglob("*") if path.is_file()]
                assert 1 <= len(written) <= 2  # these stay (content-addressed), unnamed

                filler.unlink()
                again = await submit("a harbour at night", 3)
                assert again.status is S.SUCCEEDED, again.error
                assert [image.index for image in again.images] == [0, 1]
            finally:
                stop.set()
                await running
            assert worker.gave_up is None and not running.exception()

            async with database.session() as session:  # no row points at a missing blob
                keys = list(await session.scalars(select(Image.blob_key)))
                grids = list(
                    await session.scalars(
                        select(Generation.grid_blob_key).where(
                            Generation.grid_blob_key.is_not(None)
                        )
                    )
                )
            assert len(keys) == 2 and len(grids) == 1
            for key in keys + grids:
                assert await blobs.exists(key)


async def test_a_full_database_store_says_so_and_works_again_with_room(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    admin_url = request.getfixturevalue("postgres_admin_url")
    if admin_url.host not in ("127.0.0.1", "localhost"):
        pytest.skip("the tablespace on a small disk must be on the database server's machine")
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no `postgres` user to own the tablespace folder")
    # The server's user must reach the folder: pytest's own folders are private to root.
    where = Path(tempfile.mkdtemp(prefix="imagine-test-full-"))
    os.chmod(where, 0o755)
    tablespace = f"imagine_full_{os.getpid()}"
    admin = Database(admin_url)
    try:
        with small_disk(where / "disk", "2m") as disk:
            folder = disk / "tablespace"
            folder.mkdir()
            os.chown(folder, owner.pw_uid, owner.pw_gid)
            async with admin.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as c:
                await c.execute(text(f"CREATE TABLESPACE {tablespace} LOCATION '{folder}'"))
            try:
                async with migrated_database("postgresql", tmp_path, request) as database:
                    async with database.session() as session:
                        moved = f"ALTER TABLE blobs SET TABLESPACE {tablespace}"
                        await session.execute(text(moved))
                    store = DatabaseBlobStore(database)
                    filler = fill(disk, leave=64 * 1024)
                    with pytest.raises(BlobStoreFull) as raised:
                        await store.put(os.urandom(1024 * 1024))
                    assert str(raised.value) == FULL
                    filler.unlink()
                    key = await store.put(os.urandom(1024 * 1024))
                    assert await store.exists(key)
            finally:
                async with admin.engine.execution_options(
                    isolation_level="AUTOCOMMIT"
                ).connect() as c:
                    await c.execute(text(f"DROP TABLESPACE IF EXISTS {tablespace}"))
    finally:
        await admin.dispose()
        with suppress(OSError):
            os.rmdir(where)


def test_doctor_warns_when_the_data_folder_s_disk_is_nearly_full(tmp_path: Path) -> None:
    roomy = check_disk(Settings(data_dir=tmp_path / "not-yet-made"))
    if roomy.status != "ok":
        pytest.skip(f"this machine's own disk is low: {roomy.detail}")
    assert "GiB free" in roomy.detail
    with small_disk(tmp_path / "disk", "64m") as disk:  # under LOW_DISK_BYTES free
        check = check_disk(Settings(data_dir=disk / "data", blob_dir=tmp_path / "blobs"))
    assert check.status == "warn", check.detail
    assert str(disk / "data") in check.detail
    assert "low on space" in check.detail and "IMAGINE_DATA_DIR" in check.detail
    assert LOW_DISK_BYTES > 64 * 2**20
