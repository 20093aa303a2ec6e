"""Engines, sessions, and turning database failures into sentences.

One :class:`Database` per process. SQLite runs in WAL mode with full
synchronous commits and foreign keys on; PostgreSQL goes through asyncpg.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from storage.errors import (
    ConfigError,
    DatabaseMisconfigured,
    DatabaseUnavailable,
    QueueUnavailable,
)
from storage.settings import Settings

URL_EXAMPLES = (
    "sqlite+aiosqlite:///path/to/imagine.db or postgresql+asyncpg://user:password@host:5432/imagine"
)
_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


def insert_or_ignore(
    dialect: str, table: Any, values: Any, conflict: Sequence[Any]
) -> postgresql.Insert | sqlite.Insert:
    """``INSERT … ON CONFLICT (conflict) DO NOTHING`` in ``dialect`` (PostgreSQL or SQLite):
    a row that is there already, or arrives concurrently, stands. With ``values`` None the
    rows come as the execution's parameters (a statement that can be built once)."""
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    if values is not None:
        insert = insert.values(values)
    return insert.on_conflict_do_nothing(index_elements=conflict)


def parse_database_url(raw: str) -> URL:
    """Validate a database URL and pick the async driver for its database.

    ``postgresql://`` and ``sqlite://`` are accepted and mapped to asyncpg and
    aiosqlite, the only drivers Imagine runs on.
    """
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError(
            f"IMAGINE_DATABASE_URL {raw!r} is not a database URL; use {URL_EXAMPLES}."
        ) from None
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise ConfigError(
            f"IMAGINE_DATABASE_URL uses {url.drivername!r}, which Imagine does not support; "
            f"use {URL_EXAMPLES}."
        )
    url = url.set(drivername=driver)
    if driver.startswith("sqlite"):
        if not url.database or url.database == ":memory:":
            raise ConfigError(
                "IMAGINE_DATABASE_URL must name a SQLite file (an in-memory database "
                "would lose every image's record); use sqlite+aiosqlite:///path/to/imagine.db."
            )
    elif not url.database:
        raise ConfigError(
            "IMAGINE_DATABASE_URL names no database; add it after the host, "
            "as in postgresql+asyncpg://user@host:5432/imagine."
        )
    return url


def describe_url(url: URL) -> str:
    """The URL with any password hidden, for messages and logs."""
    return url.render_as_string(hide_password=True)


def ensure_writable_dir(path: Path, setting: str) -> Path:
    """Create ``path`` if needed and prove a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"The folder {path} is not writable ({reason}); "
            f"set {setting} to a folder you can write to."
        ) from None
    return path


DEFAULT_BUSY_TIMEOUT = 10.0


def _sqlite_pragmas(busy_timeout: float) -> Callable[[Any, Any], None]:
    def enable(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that returned is on disk, even if the process is killed next.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")
        cursor.close()

    return enable


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite giving up on a lock another connection holds (a backup,
    another writer) after its busy timeout."""
    root = exc.orig if isinstance(exc, DBAPIError) else exc
    name = str(getattr(root, "sqlite_errorname", ""))
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in str(root)


# How the drivers say "the server went away or is not back yet" (asyncpg, psycopg under
# procrastinate): a restart, a failover, an operator stopping the server.
_GONE = {
    "AdminShutdownError",
    "CannotConnectNowError",
    "ConnectionDoesNotExistError",
    "ConnectionFailureError",
    "CrashShutdownError",
    "ClientCannotConnectError",
    "TooManyConnectionsError",  # asyncpg: every slot taken, as just after a restart
}
_NETWORK_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET}
_GONE_TEXT = (
    "another operation is in progress",  # asyncpg, on a connection the server dropped mid-query
    "connection is closed",
    "connection failed",
    "server closed the connection",
    "the database system is",  # ... shutting down / starting up / in recovery mode
    "terminating connection due to administrator command",
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the database server cannot be reached right
    now, as during a restart: worth waiting and trying again, never a reason to fail a job."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DatabaseMisconfigured):
            return False  # a wrong database name or login: waiting will not fix it
        if isinstance(current, DatabaseUnavailable):
            return True
        if isinstance(current, ConnectionError | TimeoutError | socket.gaierror) or (
            isinstance(current, OSError) and current.errno in _NETWORK_ERRNOS
        ):  # refused, reset, unreachable, a host name not resolving while its server is
            # replaced (a container recreated); a full disk is not one of these
            return True
        if type(current).__name__ in _GONE:
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        message = str(current).lower()
        if type(current).__module__.split(".")[0] in {"asyncpg", "psycopg", "sqlalchemy"} and any(
            text in message for text in _GONE_TEXT
        ):
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


def is_outage(exc: BaseException) -> bool:
    """:func:`is_unavailable`, unless this task is being cancelled: a query cancelled midway
    fails with a broken connection rather than ``CancelledError``, and a loop that waits
    out outages must still stop when asked to."""
    task = asyncio.current_task()
    return is_unavailable(exc) and (task is None or not task.cancelling())


def _drop_dead_connections(context: Any) -> None:
    # SQLAlchemy takes only "connection is closed" for a disconnect on asyncpg; a connection
    # the server ended mid-query (a restart) would go back to the pool and fail again.
    if not context.is_disconnect and is_unavailable(context.original_exception):
        context.is_disconnect = True


def _skip_closed_connections(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    # In place of pool_pre_ping, whose ping costs three round trips (BEGIN, a query,
    # ROLLBACK) per session: a server that restarted or shut down ended its connections,
    # and asyncpg has seen the socket close. One dropped silently fails its first query,
    # which _drop_dead_connections then treats as a disconnect (the pool starts afresh).
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is not None and driver.is_closed():
        raise DisconnectionError("the server closed this connection")  # the pool takes another


def create_engine(
    url: URL, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, **kwargs: Any
) -> AsyncEngine:
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(busy_timeout))
        return engine
    engine = create_async_engine(url, **kwargs)
    event.listen(engine.sync_engine, "handle_error", _drop_dead_connections)
    event.listen(engine.sync_engine.pool, "checkout", _skip_closed_connections)
    return engine


def explain_connection_error(url: URL, exc: BaseException) -> DatabaseUnavailable:
    """Turn a driver's connection failure into one sentence saying what to fix."""
    where = describe_url(url)
    root: BaseException = exc
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        root = exc.orig
    root = getattr(root, "__cause__", None) or root
    name = type(root).__name__
    if url.get_backend_name() == "sqlite":
        return DatabaseUnavailable(
            f"Cannot open the SQLite database {url.database} ({root}); "
            "check that its folder exists and is writable, or set IMAGINE_DATA_DIR."
        )
    host = f"{url.host or 'localhost'}:{url.port or 5432}"
    if name == "InvalidCatalogNameError":
        return DatabaseMisconfigured(
            f"The PostgreSQL server at {host} has no database {url.database!r}; "
            f"create it (createdb -h {url.host or 'localhost'} {url.database}) "
            "or fix IMAGINE_DATABASE_URL."
        )
    if name in {"InvalidPasswordError", "InvalidAuthorizationSpecificationError"}:
        return DatabaseMisconfigured(
            f"PostgreSQL at {host} refused the login for user {url.username!r} ({root}); "
            "fix the user or password in IMAGINE_DATABASE_URL."
        )
    if isinstance(root, socket.gaierror):
        return DatabaseUnavailable(
            f"The database host {url.host!r} in IMAGINE_DATABASE_URL cannot be resolved; "
            "fix the host name."
        )
    if isinstance(root, (ConnectionRefusedError, TimeoutError)) or (
        isinstance(root, OSError) and root.errno in {errno.ECONNREFUSED, errno.EHOSTUNREACH}
    ):
        return DatabaseUnavailable(
            f"Cannot reach PostgreSQL at {host} ({root.__class__.__name__}); "
            "start the server or fix the host and port in IMAGINE_DATABASE_URL."
        )
    return DatabaseUnavailable(
        f"Cannot use the database {where} ({name}: {root}); check IMAGINE_DATABASE_URL."
    )


class Database:
    """The engine and session factory of one process."""

    def __init__(
        self, url: URL, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, **engine_kwargs: Any
    ) -> None:
        self.url = url
        self.engine = create_engine(url, busy_timeout, **engine_kwargs)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings, **engine_kwargs: Any) -> Database:
        url = parse_database_url(settings.resolved_database_url)
        if url.get_backend_name() == "sqlite" and url.database:
            ensure_writable_dir(Path(url.database).expanduser().parent, "IMAGINE_DATA_DIR")
        return cls(url, settings.sqlite_busy_timeout, **engine_kwargs)

    @property
    def backend(self) -> str:
        return self.url.get_backend_name()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error.

        A SQLite file locked past the busy timeout raises :class:`QueueUnavailable`.
        """
        async with self._locked_as_unavailable(), self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection on which each statement commits by itself: for writes that are one
        statement (atomic on its own), it saves the round trips of a BEGIN and a COMMIT.

        A SQLite file locked past the busy timeout raises :class:`QueueUnavailable`.
        """
        async with self._locked_as_unavailable(), self.engine.connect() as connection:
            yield await connection.execution_options(isolation_level="AUTOCOMMIT")

    @asynccontextmanager
    async def autocommit_session(self) -> AsyncIterator[AsyncSession]:
        """A session on an :meth:`autocommit` connection: each statement commits by itself
        and costs one round trip (no BEGIN and COMMIT around it). For one statement that
        does all the work, or for reads that need not agree with each other.

        A SQLite file locked past the busy timeout raises :class:`QueueUnavailable`.
        """
        async with (
            self.autocommit() as connection,
            AsyncSession(bind=connection, expire_on_commit=False) as session,
        ):
            yield session

    @asynccontextmanager
    async def _locked_as_unavailable(self) -> AsyncIterator[None]:
        try:
            yield
        except OperationalError as exc:
            if self.backend == "sqlite" and is_locked(exc):
                raise QueueUnavailable() from exc
            raise

    async def check(self) -> None:
        """Connect once, raising :class:`DatabaseUnavailable` with a sentence if that fails."""
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except (OSError, OperationalError, DBAPIError) as exc:
            raise explain_connection_error(self.url, exc) from None
        except Exception as exc:  # asyncpg raises its own classes before SQLAlchemy wraps them
            if type(exc).__module__.startswith("asyncpg"):
                raise explain_connection_error(self.url, exc) from None
            raise

    async def wait_until_back(self, *, within: float = math.inf, every: float = 1.0) -> None:
        """Return once the database answers again (by default however long that takes);
        :class:`QueueUnavailable` after ``within`` seconds of trying. A server that answers
        but refuses the configured database or login raises :class:`DatabaseMisconfigured`
        at once: no wait brings that back."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                await self.check()
                return
            except DatabaseMisconfigured:
                raise
            except DatabaseUnavailable:
                if asyncio.get_running_loop().time() >= deadline:
                    raise QueueUnavailable() from None
            await asyncio.sleep(every)

    async def dispose(self) -> None:
        await self.engine.dispose()
