"""Backups: a consistent snapshot of the database and of the files it points at, in a folder.

A backup folder holds ``manifest.json``, the database (``database.sqlite3``, copied with
SQLite's online backup API, or ``database.pgdump``, ``pg_dump``'s custom format), the blob
files under ``blobs/`` in the blob folder's own layout (none when blobs are kept in the
database: they come with it) and the styles folder under ``styles/``. The manifest lists
every file with its size and sha256, the schema revision and the rows per table, so a
restore (:mod:`storage.restore`) can check the backup before it writes anything and check
the database after.

Blobs are content-addressed and never change, and a worker stores a blob before the row
that names it, so the database is snapshotted first and every blob the snapshot names is
copied after it, checked against its key. The folder is built under a temporary name and
renamed at the end, so an interrupted backup never looks complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import URL

from storage.blobs import LocalBlobStore, check_key
from storage.database import explain_connection_error
from storage.errors import ConfigError, ImagineError

FORMAT = 1
MANIFEST = "manifest.json"
SQLITE_FILE = "database.sqlite3"
POSTGRES_FILE = "database.pgdump"
CHUNK = 1 << 20
# A blob is referenced by any column named like this one (images, grids, LoRAs, ...),
# and by these fields of a recipe: an image prompt's stored image (ImageRef), a control's
# uploaded image and the map made from it (ControlRef).
BLOB_KEY_SUFFIX = "blob_key"
RECIPE_BLOB_FIELDS = ("blob_key", "source_key", "map_key")
_RECIPE_BLOB_KEY = re.compile(rf'"(?:{"|".join(RECIPE_BLOB_FIELDS)})"\s*:\s*"([0-9a-f]{{64}})"')
# Recipes that may name a blob: each of those fields' names ends so.
_NAMES_A_BLOB = '%key"%'
_RECIPES = "generations"


def recipe_blob_keys(recipes: Iterable[str]) -> set[str]:
    """The blob keys the recipes (as JSON text) name."""
    return {key for text in recipes for key in _RECIPE_BLOB_KEY.findall(text)}


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # relative to the backup folder, with forward slashes
    size: int
    sha256: str


class Manifest(BaseModel):
    """What a backup holds; ``manifest.json`` of the backup folder."""

    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT
    created_at: datetime
    database: Literal["sqlite", "postgresql"]
    revision: str
    blob_store: Literal["folder", "database"]
    database_file: FileEntry
    counts: dict[str, int]  # rows per table in the snapshot
    blobs: list[FileEntry]
    missing_blobs: list[str] = []  # referenced, but absent or damaged in the blob folder
    styles: list[FileEntry] = []


@dataclass
class DatabaseFacts:
    revision: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    blob_keys: set[str] = field(default_factory=set)


class BackupError(ImagineError):
    """A backup cannot be taken or restored; the message says why and what to do."""


# -- files ---------------------------------------------------------------------------------------


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(source: Path, target: Path) -> tuple[int, str]:
    """Copy ``source`` to ``target`` (synced to disk); its size and sha256."""
    digest = hashlib.sha256()
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return size, digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(folder: Path, path: Path, size: int, sha256: str) -> FileEntry:
    return FileEntry(path=path.relative_to(folder).as_posix(), size=size, sha256=sha256)


def files_under(root: Path) -> Iterator[Path]:
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield path


# -- what a database holds -----------------------------------------------------------------------


def _count(table: str) -> str:
    return f'SELECT count(*) FROM "{table}"'


def _keys(table: str, column: str) -> str:
    return f'SELECT DISTINCT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL'


def sqlite_facts(path: Path) -> DatabaseFacts:
    """Revision, rows per table and referenced blob keys of a SQLite file (a snapshot)."""
    facts = DatabaseFacts()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            facts.counts[table] = connection.execute(_count(table)).fetchone()[0]
            columns = [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]
            for column in columns:
                if column.endswith(BLOB_KEY_SUFFIX):
                    facts.blob_keys |= {key for (key,) in connection.execute(_keys(table, column))}
            if table == _RECIPES and "recipe" in columns:
                rows = connection.execute(
                    f'SELECT recipe FROM "{table}" WHERE recipe LIKE ?', (_NAMES_A_BLOB,)
                )
                facts.blob_keys |= recipe_blob_keys(str(text) for (text,) in rows)
        if "alembic_version" in tables:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            facts.revision = row[0] if row else None
    return facts


async def _postgres_facts(connection: Any) -> DatabaseFacts:
    facts = DatabaseFacts()
    tables = [
        row["table_name"]
        for row in await connection.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
        )
    ]
    for table in tables:
        facts.counts[table] = await connection.fetchval(_count(table))
    for row in await connection.fetch(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND column_name LIKE $1",
        f"%{BLOB_KEY_SUFFIX}",
    ):
        keys = await connection.fetch(_keys(row["table_name"], row["column_name"]))
        facts.blob_keys |= {key[0] for key in keys}
    if _RECIPES in tables:
        rows = await connection.fetch(
            f'SELECT recipe::text FROM "{_RECIPES}" WHERE recipe::text LIKE $1', _NAMES_A_BLOB
        )
        facts.blob_keys |= recipe_blob_keys(row[0] for row in rows)
    if "alembic_version" in tables:
        facts.revision = await connection.fetchval("SELECT version_num FROM alembic_version")
    return facts


def libpq_dsn(url: URL) -> str:
    """``url`` as libpq and asyncpg read it, without its password (given by PGPASSWORD)."""
    return url.set(drivername="postgresql", password=None, query={}).render_as_string(
        hide_password=False
    )


def _tool_env(url: URL) -> dict[str, str]:
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    return env


async def connect(url: URL) -> Any:
    import asyncpg

    password = None if url.password is None else str(url.password)
    try:
        return await asyncpg.connect(libpq_dsn(url), password=password)
    except (OSError, asyncpg.PostgresError) as exc:
        raise explain_connection_error(url, exc) from None


async def postgres_facts(url: URL) -> DatabaseFacts:
    connection = await connect(url)
    try:
        return await _postgres_facts(connection)
    finally:
        await connection.close()


async def run_tool(*args: str, url: URL) -> None:
    """Run ``pg_dump`` or ``pg_restore``; a failure becomes a sentence."""
    try:
        process = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=_tool_env(url),
        )
    except FileNotFoundError:
        raise ConfigError(
            f"{args[0]} is not installed; install PostgreSQL's client tools "
            "(apt-get install postgresql-client) in the same major version as the server."
        ) from None
    _, stderr = await process.communicate()
    if process.returncode != 0:
        said = stderr.decode(errors="replace").strip()
        if "version mismatch" in said:
            raise ConfigError(
                f"{args[0]} is older than the PostgreSQL server ({said.splitlines()[-1]}); "
                "install the client tools of the server's major version."
            )
        last = said.splitlines()[-1] if said else "no message"
        raise BackupError(f"{args[0]} failed: {last}")


# -- taking a backup -----------------------------------------------------------------------------


def snapshot_sqlite(source: Path, target: Path, busy_timeout: float) -> None:
    """A consistent copy of a live SQLite file, taken with the online backup API.

    One step copies every page inside one read transaction: in WAL mode that never
    blocks the bot's writers, while copying in several steps would start over each
    time another connection writes.
    """
    if not source.is_file():
        raise BackupError(
            f"There is no database at {source} to back up; check IMAGINE_DATA_DIR "
            "and IMAGINE_DATABASE_URL."
        )
    with (
        contextlib.closing(sqlite3.connect(source, timeout=busy_timeout)) as live,
        contextlib.closing(sqlite3.connect(target)) as copy,
    ):
        live.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    fsync(target)


async def dump_postgres(url: URL, target: Path) -> DatabaseFacts:
    """``pg_dump`` of the database, and its facts read in the very snapshot pg_dump uses."""
    connection = await connect(url)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await connection.fetchval("SELECT pg_export_snapshot()")
            facts = await _postgres_facts(connection)
            await run_tool(
                "pg_dump",
                "--format=custom",
                f"--snapshot={snapshot}",
                f"--file={target}",
                f"--dbname={libpq_dsn(url)}",
                url=url,
            )
    finally:
        await connection.close()
    fsync(target)
    return facts


def copy_blobs(
    keys: Iterable[str], source: Path, folder: Path
) -> tuple[list[FileEntry], list[str]]:
    """Copy the blob files of ``keys`` into ``folder``/blobs, checking each against its key;
    and the keys left out: missing from the blob folder, or damaged there (bytes that do not
    match their name), so that one bad file does not stop every backup."""
    here = LocalBlobStore(source)
    there = LocalBlobStore(folder / "blobs")
    entries: list[FileEntry] = []
    missing: list[str] = []
    for key in sorted(keys):
        path = here.path_for(check_key(key))
        if not path.is_file():
            missing.append(key)
            continue
        target = there.path_for(key)
        size, sha256 = copy_file(path, target)
        if sha256 != key:
            target.unlink()
            missing.append(key)
            continue
        entries.append(_entry(folder, target, size, sha256))
    return entries, missing


def copy_styles(styles_dir: Path, folder: Path) -> list[FileEntry]:
    entries = []
    for path in files_under(styles_dir):
        target = folder / "styles" / path.relative_to(styles_dir)
        size, sha256 = copy_file(path, target)
        entries.append(_entry(folder, target, size, sha256))
    return entries


@dataclass(frozen=True)
class Source:
    """What to back up: the database, the blob folder (None: blobs are in the database),
    and the styles folder."""

    url: URL
    blob_folder: Path | None
    styles_dir: Path
    busy_timeout: float


async def take_backup(source: Source, path: Path, now: datetime) -> Manifest:
    """Back ``source`` up into the new folder ``path``."""
    building = await asyncio.to_thread(_start, path)
    try:
        manifest = await _fill(source, building, now)
        await asyncio.to_thread(_finish, building, manifest, path)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return manifest


def _start(path: Path) -> Path:
    """The folder a backup is built in, beside ``path``, under a name no restore takes."""
    if path.exists():
        raise BackupError(f"{path} already exists; give a new folder name for the backup.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))


def _finish(building: Path, manifest: Manifest, path: Path) -> None:
    (building / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    fsync(building / MANIFEST)
    os.rename(building, path)


async def _fill(source: Source, folder: Path, now: datetime) -> Manifest:
    backend = source.url.get_backend_name()
    if backend == "sqlite":
        assert source.url.database is not None
        database_file = folder / SQLITE_FILE
        await asyncio.to_thread(
            snapshot_sqlite, Path(source.url.database), database_file, source.busy_timeout
        )
        facts = await asyncio.to_thread(sqlite_facts, database_file)
    else:
        database_file = folder / POSTGRES_FILE
        facts = await dump_postgres(source.url, database_file)
    if facts.revision is None:
        raise BackupError(
            "The database has no Imagine schema yet, so there is nothing to back up; "
            "check IMAGINE_DATABASE_URL and IMAGINE_DATA_DIR."
        )
    blobs: list[FileEntry] = []
    missing: list[str] = []
    if source.blob_folder is not None:
        blobs, missing = await asyncio.to_thread(
            copy_blobs, facts.blob_keys, source.blob_folder, folder
        )
    styles = await asyncio.to_thread(copy_styles, source.styles_dir, folder)
    size = database_file.stat().st_size
    sha256 = await asyncio.to_thread(file_sha256, database_file)
    return Manifest(
        created_at=now,
        database="sqlite" if backend == "sqlite" else "postgresql",
        revision=facts.revision,
        blob_store="database" if source.blob_folder is None else "folder",
        database_file=_entry(folder, database_file, size, sha256),
        counts=facts.counts,
        blobs=blobs,
        missing_blobs=missing,
        styles=styles,
    )
