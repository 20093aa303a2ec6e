"""``imagine backup PATH`` and ``imagine restore PATH [--force]``.

The work is :mod:`storage.backup`'s; this wires it to the settings, the blob store the
deployment uses and the migration history.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from bot.deployment import make_blob_store
from storage.backup import BackupError, Manifest, Source, postgres_facts, sqlite_facts, take_backup
from storage.blobs import BlobStore, LocalBlobStore
from storage.database import Database, describe_url
from storage.models import utcnow
from storage.restore import (
    folder_has_files,
    postgres_has_tables,
    read_manifest,
    restore_blobs,
    restore_postgres,
    restore_sqlite,
    restore_styles,
    sqlite_has_tables,
    verify_backup,
)
from storage.settings import Settings, load_settings


def register(commands: Any) -> None:
    backup = commands.add_parser(
        "backup",
        help="copy the database, its images and the styles into a new folder (the bot may run)",
    )
    backup.add_argument("path", type=Path, help="the folder to create; it must not exist")
    backup.set_defaults(handler=_backup)

    restore = commands.add_parser(
        "restore", help="restore a backup into the configured database and folders"
    )
    restore.add_argument("path", type=Path, help="a folder `imagine backup` made")
    restore.add_argument(
        "--force",
        action="store_true",
        help="replace a database that holds data (stop the bot first); files are only added",
    )
    restore.set_defaults(handler=_restore)


def _backup(args: argparse.Namespace) -> int:
    return asyncio.run(backup(load_settings(), args.path))


def _restore(args: argparse.Namespace) -> int:
    return asyncio.run(restore(load_settings(), args.path, force=args.force))


def _blob_folder(blobs: BlobStore) -> Path | None:
    return blobs.root if isinstance(blobs, LocalBlobStore) else None


async def backup(settings: Settings, path: Path) -> int:
    database = Database.from_settings(settings)
    try:
        source = Source(
            database.url,
            _blob_folder(make_blob_store(settings, database)),
            settings.resolved_styles_dir,
            settings.sqlite_busy_timeout,
        )
    finally:
        await database.dispose()
    manifest = await take_backup(source, path, utcnow())
    for key in manifest.missing_blobs:
        print(
            f"warning: blob {key} is missing from the blob folder, or damaged there (its "
            "bytes do not match its name), so it is not in this backup; an older backup may "
            "hold it",
            file=sys.stderr,
        )
    counts = manifest.counts
    print(
        f"backed up {describe_url(database.url)} at revision {manifest.revision}: "
        f"{counts.get('generations', 0)} generations, {counts.get('images', 0)} images, "
        f"{len(manifest.blobs)} blob files, {len(manifest.styles)} style files"
    )
    print(path)
    return 0


async def restore(settings: Settings, path: Path, *, force: bool) -> int:
    from migrations import runner

    manifest = await asyncio.to_thread(read_manifest, path)
    if manifest.revision not in runner.known_revisions():
        raise BackupError(
            f"{path} was taken at schema revision {manifest.revision}, which this Imagine "
            "does not know: a newer Imagine made it. Upgrade Imagine, then restore."
        )
    database = Database.from_settings(settings)
    try:
        target = database.url
        if database.backend != manifest.database:
            raise BackupError(
                f"{path} holds a {manifest.database} database but IMAGINE_DATABASE_URL "
                f"names a {database.backend} one; point it at an empty {manifest.database} "
                "database to restore."
            )
        blobs = make_blob_store(settings, database)
        if manifest.blob_store == "database" and isinstance(blobs, LocalBlobStore):
            raise BackupError(
                f"{path} keeps its images in the database; set IMAGINE_BLOB_STORE=database "
                "to restore it."
            )
        await asyncio.to_thread(verify_backup, path, manifest)
        occupied = await _occupied(settings, database, blobs, manifest)
        if occupied and not force:
            raise BackupError(
                f"Restoring would overwrite what is already in {' and '.join(occupied)}; "
                "restore into an empty data folder or database, or add --force to replace "
                "the database (files already there are kept)."
            )
    finally:
        await database.dispose()

    folder = _blob_folder(blobs)
    if folder is not None:  # blob files first: until the database is in, nothing names them
        await restore_blobs(path, manifest, blobs)
    await asyncio.to_thread(restore_styles, path, manifest, settings.resolved_styles_dir)
    await _restore_database(path, manifest, target, replace=bool(occupied))
    database = Database.from_settings(settings)
    try:
        if folder is None:
            await restore_blobs(path, manifest, make_blob_store(settings, database))
        await runner.upgrade(database)
        state = await runner.state(database)
    finally:
        await database.dispose()
    print(f"restored the backup of {manifest.created_at:%Y-%m-%d %H:%M:%S} UTC from {path}")
    print(state.describe())
    return 0


async def _occupied(
    settings: Settings, database: Database, blobs: BlobStore, manifest: Manifest
) -> list[str]:
    """What in the target already holds data, named for the refusal."""
    url = database.url
    found = []
    if database.backend == "sqlite":
        assert url.database is not None
        if await asyncio.to_thread(sqlite_has_tables, Path(url.database)):
            found.append(f"the database {url.database}")
    elif await postgres_has_tables(url):
        found.append(f"the database {describe_url(url)}")
    folder = _blob_folder(blobs)
    if manifest.blobs and folder is not None and folder_has_files(folder):
        found.append(f"the blob folder {folder}")
    styles = settings.resolved_styles_dir
    if manifest.styles and folder_has_files(styles):
        found.append(f"the styles folder {styles}")
    return found


async def _restore_database(path: Path, manifest: Manifest, url: URL, *, replace: bool) -> None:
    """Write the database, then check it holds the rows the manifest counted."""
    dump = path / manifest.database_file.path
    if manifest.database == "sqlite":
        assert url.database is not None
        await asyncio.to_thread(restore_sqlite, dump, Path(url.database))
        facts = await asyncio.to_thread(sqlite_facts, Path(url.database))
    else:
        await restore_postgres(dump, url, replace=replace)
        facts = await postgres_facts(url)
    for table, count in manifest.counts.items():
        if facts.counts.get(table) != count:
            raise BackupError(
                f"The restored database has {facts.counts.get(table, 0)} rows in {table}, "
                f"not the {count} the backup lists; restore again with --force, or from "
                "another backup."
            )
