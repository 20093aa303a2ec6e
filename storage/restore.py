"""Restoring a backup of :mod:`storage.backup`: check it, check the target, then write.

Nothing is written before every file of the backup matches its manifest. The SQLite
file is put in place with one rename; PostgreSQL is restored by ``pg_restore`` in one
transaction. Blob files and styles are added beside what is there: they are
content-addressed or belong to the backup, so adding them twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import tempfile
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.engine import URL

from storage.backup import (
    FORMAT,
    MANIFEST,
    BackupError,
    Manifest,
    connect,
    copy_file,
    file_sha256,
    files_under,
    libpq_dsn,
    run_tool,
)
from storage.blobs import BlobStore


def read_manifest(path: Path) -> Manifest:
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise BackupError(
            f"{path} is not a complete Imagine backup (it has no {MANIFEST}); "
            "give the folder `imagine backup` made."
        )
    damaged = BackupError(
        f"{manifest_file} cannot be read; the backup is damaged: restore from another one."
    )
    try:
        raw = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        raise damaged from None
    newer = raw.get("format") if isinstance(raw, dict) else None
    if isinstance(newer, int) and newer > FORMAT:
        raise BackupError(
            f"{path} was made by a newer Imagine (backup format {newer}); "
            "upgrade Imagine, then restore."
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError:
        raise damaged from None


def verify_backup(path: Path, manifest: Manifest) -> None:
    """Every file the manifest lists is there, with its size and sha256."""
    for entry in [manifest.database_file, *manifest.blobs, *manifest.styles]:
        file = path / entry.path
        if not file.is_file():
            problem = "is missing"
        elif file.stat().st_size != entry.size:
            problem = f"has {file.stat().st_size} bytes, not {entry.size}"
        elif file_sha256(file) != entry.sha256:
            problem = "does not have the sha256 the manifest lists"
        elif entry.path.startswith("blobs/") and Path(entry.path).name != entry.sha256:
            problem = "is not stored under its sha256"
        else:
            continue
        raise BackupError(
            f"The backup {path} is damaged: {entry.path} {problem}; nothing was restored. "
            "Restore from another backup."
        )


def sqlite_has_tables(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            row = connection.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()
    except sqlite3.DatabaseError:
        return True  # something that is not a database: not ours to overwrite unasked
    return bool(row[0])


async def postgres_has_tables(url: URL) -> bool:
    connection = await connect(url)
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await connection.close()
    return bool(count)


def folder_has_files(folder: Path) -> bool:
    return next(files_under(folder), None) is not None


def restore_sqlite(snapshot: Path, target: Path) -> None:
    """Put the snapshot in place of ``target`` in one rename; the old WAL goes first, since
    SQLite would replay it into the new file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=".restore-", suffix=".db")
    os.close(fd)
    temporary = Path(name)
    try:
        copy_file(snapshot, temporary)
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


async def restore_postgres(dump: Path, url: URL, *, replace: bool) -> None:
    """``pg_restore`` in one transaction; ``replace`` first drops what the target holds,
    once ``pg_restore`` has shown it can read the dump (a client older than the dump's
    format cannot): what fails there leaves the database as it was."""
    try:
        await run_tool("pg_restore", "--list", str(dump), url=url)
    except BackupError as exc:
        raise BackupError(f"{exc}; nothing in the database was changed.") from None
    if replace:
        connection = await connect(url)
        try:
            await connection.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
        finally:
            await connection.close()
    await run_tool(
        "pg_restore",
        "--no-owner",
        "--no-privileges",
        "--exit-on-error",
        "--single-transaction",
        f"--dbname={libpq_dsn(url)}",
        str(dump),
        url=url,
    )


async def restore_blobs(path: Path, manifest: Manifest, blobs: BlobStore) -> None:
    for entry in manifest.blobs:
        data = await asyncio.to_thread((path / entry.path).read_bytes)
        if await blobs.put(data) != entry.sha256:
            raise BackupError(f"The blob {entry.path} changed while it was restored; try again.")


def restore_styles(path: Path, manifest: Manifest, styles_dir: Path) -> None:
    for entry in manifest.styles:
        copy_file(path / entry.path, styles_dir / Path(entry.path).relative_to("styles"))
