"""Opening the storage side for a process: database (migrated), blob store, settings."""

from __future__ import annotations

from dataclasses import dataclass

from storage.blobs import BlobStore, DatabaseBlobStore, LocalBlobStore
from storage.database import Database, ensure_writable_dir
from storage.errors import ConfigError
from storage.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    database: Database
    blobs: BlobStore

    async def close(self) -> None:
        await self.database.dispose()


def make_blob_store(settings: Settings, database: Database) -> BlobStore:
    kind = settings.blob_store
    if kind == "auto":
        kind = "folder" if settings.is_embedded else "database"
    if kind == "database":
        return DatabaseBlobStore(database)
    store = LocalBlobStore(settings.resolved_blob_dir)
    store.ensure_writable()
    return store


async def open_runtime(settings: Settings) -> Runtime:
    """Connect and prepare storage.

    Embedded mode (SQLite) upgrades the schema itself; the scaled mode expects an
    operator to run ``imagine db upgrade`` and refuses a database that is behind.
    """
    from migrations import runner

    if settings.is_embedded:
        ensure_writable_dir(settings.data_dir, "IMAGINE_DATA_DIR")
    database = Database.from_settings(settings)
    try:
        if settings.is_embedded:
            await runner.upgrade(database)
        else:
            state = await runner.state(database)
            if not state.is_current:
                raise ConfigError(f"The database is not at the newest schema ({state.describe()}).")
        blobs = make_blob_store(settings, database)
    except BaseException:
        await database.dispose()
        raise
    return Runtime(settings=settings, database=database, blobs=blobs)
