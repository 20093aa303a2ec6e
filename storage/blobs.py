"""Content-addressed blob store: images and LoRA files, keyed by their sha256.

The contract is :class:`BlobStore`; :class:`LocalBlobStore` keeps blobs in a
folder, writing each one to a temporary file, fsyncing it and renaming it into
place, so a crash never leaves a half-written blob under a real key. A store
without room raises :class:`~storage.errors.BlobStoreFull` and keeps nothing of
the blob it could not write.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import re
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from sqlalchemy import delete, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from storage.errors import BlobNotFound, BlobStoreFull, ConfigError
from storage.precompiled import Precompiled

if TYPE_CHECKING:
    from storage.database import Database

_KEY = re.compile(r"^[0-9a-f]{64}$")
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT}
DISK_FULL_SQLSTATE = "53100"  # PostgreSQL's disk_full: a table or its TOAST could not grow


def blob_key(data: bytes) -> str:
    """The key a blob is stored under: its sha256, as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a blob key (64 lowercase hex digits)")
    return key


@runtime_checkable
class BlobStore(Protocol):
    async def put(self, data: bytes) -> str:
        """Store ``data``; returns its key. Storing the same bytes twice is harmless."""
        ...

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        """Store each of ``datas`` (as :meth:`put` would); returns their keys, in order."""
        ...

    async def get(self, key: str) -> bytes:
        """The bytes under ``key``; :class:`BlobNotFound` if there are none."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Remove the blob; deleting a missing key is not an error."""
        ...


class LocalBlobStore:
    """Blobs as files ``<root>/ab/cd/abcd…`` on a local (or mounted) folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key[2:4] / key

    def ensure_writable(self) -> None:
        from storage.database import ensure_writable_dir

        ensure_writable_dir(self.root, "IMAGINE_BLOB_DIR")

    async def put(self, data: bytes) -> str:
        key = blob_key(data)
        await asyncio.to_thread(self._write, key, data)
        return key

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        return [await self.put(data) for data in datas]

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path_for(key).read_bytes)
        except FileNotFoundError:
            raise BlobNotFound(f"No blob is stored under {key}.") from None

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_for(key).is_file)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path_for(key).unlink, missing_ok=True)

    def _write(self, key: str, data: bytes) -> None:
        final = self.path_for(key)
        if final.is_file() and _holds(final, key):
            return  # a damaged file of that name (bit rot, a cut copy) is replaced below
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise BlobStoreFull() from exc
            raise ConfigError(
                f"Cannot create {final.parent} ({exc.strerror}); "
                "set IMAGINE_BLOB_DIR to a folder you can write to."
            ) from None
        try:
            fd, temporary = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=".part")
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise BlobStoreFull() from exc
            raise
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException as exc:
            Path(temporary).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
                raise BlobStoreFull() from exc
            raise
        _fsync_dir(final.parent)


def _holds(path: Path, key: str) -> bool:
    """Whether the file at ``path`` holds the bytes whose sha256 is ``key``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == key


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _insert_blobs(dialect: Dialect) -> Precompiled:
    """Compiled once per dialect: building and compiling it for each job cost more than
    its round trip."""
    from storage.database import insert_or_ignore
    from storage.models import Blob

    return Precompiled(insert_or_ignore(dialect.name, Blob, None, [Blob.key]), dialect)


class DatabaseBlobStore:
    """Blobs as rows of the ``blobs`` table: every worker that reaches the database can share them.

    Meant for PostgreSQL (``bytea``); a row is written in one transaction, so a crash
    leaves either the whole blob or none.
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    async def put(self, data: bytes) -> str:
        return (await self.put_many([data]))[0]

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        from storage.models import utcnow

        keys = [blob_key(data) for data in datas]
        rows = {key: data for key, data in zip(keys, datas, strict=True)}
        if not rows:
            return keys
        now = utcnow()
        try:
            async with self.database.autocommit() as connection:
                # One statement, so one transaction of its own: the same bytes stored already
                # (or concurrently) have the same key and the same data; the existing row stands.
                await _insert_blobs(connection.dialect).execute_many(
                    connection,
                    [
                        {"key": key, "data": data, "size": len(data), "created_at": now}
                        for key, data in rows.items()
                    ],
                )
        except DBAPIError as exc:
            if _disk_full(exc):
                raise BlobStoreFull() from exc
            raise
        return keys

    async def get(self, key: str) -> bytes:
        from storage.models import Blob

        check_key(key)
        async with self.database.session() as session:
            data = await session.scalar(select(Blob.data).where(Blob.key == key))
        if data is None:
            raise BlobNotFound(f"No blob is stored under {key}.")
        return bytes(data)

    async def exists(self, key: str) -> bool:
        from storage.models import Blob

        check_key(key)
        async with self.database.session() as session:
            return await session.scalar(select(Blob.key).where(Blob.key == key)) is not None

    async def delete(self, key: str) -> None:
        from storage.models import Blob

        check_key(key)
        async with self.database.session() as session:
            await session.execute(delete(Blob).where(Blob.key == key))


def _disk_full(error: DBAPIError) -> bool:
    """Whether the database refused a write for lack of room (PostgreSQL's SQLSTATE, or
    SQLite's result code; the drivers' own exceptions hide under SQLAlchemy's)."""
    cause: BaseException | None = error.orig
    while cause is not None:
        if getattr(cause, "sqlstate", None) == DISK_FULL_SQLSTATE:
            return True
        if getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        cause = cause.__cause__
    return False
