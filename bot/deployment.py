"""Opening a deployment: the only place that chooses between the embedded and the scaled mode.

:func:`open_deployment` connects the database (upgrading SQLite itself, refusing a
PostgreSQL schema that is behind) and returns a :class:`storage.deployment.Deployment`
of typed ports: the job queue, the event bus, the blob store and the worker's job
source. ``imagine bot``, ``imagine worker``, the local commands and the tests all open
one here. On PostgreSQL a worker also hears cancels from other processes by LISTEN.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from storage.blobs import BlobStore, DatabaseBlobStore, LocalBlobStore
from storage.database import Database, ensure_writable_dir
from storage.deployment import Deployment, Mode
from storage.errors import ConfigError
from storage.events import EventBus, LocalEventBus
from storage.queue import Cancellations, CancelListener, JobQueue, JobSource, RowJobs, RowQueue
from storage.scheduling import Limits
from storage.settings import Settings


def resolve_mode(settings: Settings) -> Mode:
    """``IMAGINE_MODE``, with ``auto`` resolved: embedded on SQLite, scaled on PostgreSQL."""
    if settings.mode != "auto":
        mode: Mode = settings.mode
    else:
        mode = "embedded" if settings.uses_sqlite else "scaled"
    if mode == "scaled" and settings.uses_sqlite:
        raise ConfigError(
            "The scaled mode needs PostgreSQL: set IMAGINE_DATABASE_URL to a "
            "postgresql+asyncpg:// URL, or IMAGINE_MODE=embedded."
        )
    return mode


def make_blob_store(settings: Settings, database: Database) -> BlobStore:
    kind = settings.blob_store
    if kind == "auto":
        kind = "folder" if resolve_mode(settings) == "embedded" else "database"
    if kind == "database":
        return DatabaseBlobStore(database)
    store = LocalBlobStore(settings.resolved_blob_dir)
    store.ensure_writable()
    return store


def _cancel_listener(database: Database) -> CancelListener | None:
    if database.url.get_backend_name() != "postgresql":
        return None  # SQLite cannot tell other processes; workers poll the flag
    from storage.pg_events import listen_for_cancels

    async def listen(on_cancel: Callable[[int], object]) -> None:
        await listen_for_cancels(database.url, on_cancel)

    return listen


async def _prepare_database(database: Database, settings: Settings) -> None:
    """Embedded SQLite upgrades its schema itself; elsewhere an operator runs
    ``imagine db upgrade``, and a database that is behind is refused."""
    from migrations import runner

    if settings.uses_sqlite:
        await runner.upgrade(database)
        return
    state = await runner.state(database)
    if not state.is_current:
        raise ConfigError(f"The database is not at the newest schema ({state.describe()}).")


@contextlib.asynccontextmanager
async def open_deployment(settings: Settings) -> AsyncIterator[Deployment]:
    """Open the deployment ``settings`` describe; everything is closed on exit."""
    deployment = await start_deployment(settings)
    try:
        yield deployment
    finally:
        await deployment.close()


async def start_deployment(settings: Settings) -> Deployment:
    """Open the deployment ``settings`` describe; the caller awaits its ``close()``."""
    mode = resolve_mode(settings)
    if settings.uses_sqlite:
        ensure_writable_dir(settings.data_dir, "IMAGINE_DATA_DIR")
    limits = Limits(settings.max_running_per_user, settings.max_queued_per_user)
    stale = settings.worker_stale_seconds
    cancellations = Cancellations()
    stack = contextlib.AsyncExitStack()
    try:
        database = Database.from_settings(settings)
        stack.push_async_callback(database.dispose)
        await _prepare_database(database, settings)
        blobs = make_blob_store(settings, database)
        queue: JobQueue
        jobs: JobSource
        events: EventBus
        if mode == "embedded":
            events = LocalEventBus()
            wakeup = asyncio.Event()
            queue = RowQueue(database, limits, events, cancellations, wakeup, stale)
            jobs = RowJobs(database, limits, wakeup, max_batch=settings.max_batch)
        else:
            from storage.pg_events import PostgresEventBus
            from storage.scaled_queue import ProcrastinateJobs, ProcrastinateQueue, make_app

            events = PostgresEventBus(database)
            app = make_app(database.url)
            await stack.enter_async_context(app.open_async())
            scaled = ProcrastinateQueue(database, limits, app, events, cancellations, stale)
            queue = scaled
            jobs = ProcrastinateJobs(
                scaled, settings.worker_heartbeat_seconds, max_batch=settings.max_batch
            )
        stack.push_async_callback(events.close)
    except BaseException:
        await stack.aclose()
        raise
    return Deployment(
        mode,
        settings,
        database,
        blobs,
        queue,
        events,
        jobs,
        cancellations,
        _cancel_listener(database),
        stack,
    )
