"""Shared fixtures: a fresh, migrated database on SQLite and on PostgreSQL.

PostgreSQL is the server at ``IMAGINE_TEST_POSTGRES_URL`` (default
127.0.0.1:5432, user postgres). When nothing answers there, the session starts
a throwaway cluster of its own from the installed PostgreSQL server binaries
(see ``tests/throwaway_postgres.py``) and removes it at the end. Each test gets
its own new database, dropped afterwards. Without any PostgreSQL the
PostgreSQL half is skipped, except under CI (``CI=true``), where it must run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
from sqlalchemy.engine import URL, make_url

from storage.database import Database, parse_database_url
from storage.settings import Settings
from tests.throwaway_postgres import (
    INSTALL_HINT,
    ThrowawayPostgres,
    ThrowawayPostgresError,
    server_bin_dir,
)

if TYPE_CHECKING:
    from generation.engine import Engine

POSTGRES_URL = os.environ.get(
    "IMAGINE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


def _asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _probe(url: URL) -> None:
    import asyncpg

    connection = await asyncpg.connect(_asyncpg_dsn(url), timeout=5)
    await connection.close()


def _probe_error(url: URL) -> Exception | None:
    """Why nothing usable answers at ``url``, or None if it does."""
    try:
        # Run on a thread of its own: this fixture may be first asked for inside a running loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, _probe(url)).result()
    except Exception as exc:
        return exc
    return None


def _no_postgres(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI must run the PostgreSQL tests: {reason}.")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[URL]:
    """A server where the tests may create databases: the configured one, else a throwaway."""
    url = parse_database_url(POSTGRES_URL)
    problem = _probe_error(url)
    if problem is None:
        yield url
        return
    unreachable = f"PostgreSQL is not reachable at {url.host}:{url.port} ({problem!r})"
    bin_dir = server_bin_dir()
    if bin_dir is None:
        _no_postgres(f"{unreachable} and no PostgreSQL server is installed; {INSTALL_HINT}")
    server = ThrowawayPostgres(bin_dir)
    try:
        try:
            throwaway = server.start()
        except (ThrowawayPostgresError, OSError, subprocess.SubprocessError) as exc:
            _no_postgres(
                f"{unreachable} and a throwaway server did not start ({exc}); {INSTALL_HINT}"
            )
        yield throwaway
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def new_database(backend: str, tmp_path: Path, admin: URL | None) -> AsyncIterator[URL]:
    """A new, empty database on ``backend`` (dropped afterwards on PostgreSQL)."""
    if backend == "sqlite":
        yield make_url(f"sqlite+aiosqlite:///{tmp_path / f'imagine-{uuid.uuid4().hex[:8]}.db'}")
        return
    import asyncpg

    assert admin is not None
    name = f"imagine_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(_asyncpg_dsn(admin))
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    try:
        yield admin.set(database=name)
    finally:
        connection = await asyncpg.connect(_asyncpg_dsn(admin))
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


@asynccontextmanager
async def migrated_database(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Database]:
    from migrations import runner

    admin = request.getfixturevalue("postgres_admin_url") if backend == "postgresql" else None
    async with new_database(backend, tmp_path, admin) as url:
        database = Database(url)
        try:
            await runner.upgrade(database)
            yield database
        finally:
            await database.dispose()


@pytest.fixture
async def database_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[URL]:
    """The URL of a new, empty database on ``backend``."""
    admin = request.getfixturevalue("postgres_admin_url") if backend == "postgresql" else None
    async with new_database(backend, tmp_path, admin) as url:
        yield url


@pytest.fixture
async def empty_database(database_url: URL) -> AsyncIterator[Database]:
    database = Database(database_url)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
async def database(empty_database: Database) -> Database:
    """A database migrated to head."""
    from migrations import runner

    await runner.upgrade(empty_database)
    return empty_database


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No IMAGINE_* variables from the outside; the data folder in tmp_path."""
    for name in list(os.environ):
        if name.startswith("IMAGINE_") or name == "DISCORD_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("IMAGINE_DATA_DIR", str(data_dir))
    yield data_dir


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """An empty Hugging Face cache, offline mode, and any connection attempt fails."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a single-file checkpoint must load without the network")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield


@pytest.fixture(scope="session")
def engine_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for the tiny offline model, with a styles folder of its own."""
    data_dir = tmp_path_factory.mktemp("engine-data")
    (data_dir / "styles").mkdir()
    return Settings(data_dir=data_dir, model="tiny", device="cpu", preview_every=2)


@pytest.fixture(scope="session")
def tiny_engine(engine_settings: Settings) -> Engine:
    from generation.engine import Engine

    return Engine.from_settings(engine_settings)


@pytest.fixture
def pipeline_calls(tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The images (generators) of each call of the tiny engine's pipeline, as they run."""
    calls: list[int] = []
    original = type(tiny_engine.pipe).__call__

    def counting(pipe: object, *args: object, **kwargs: object) -> object:
        calls.append(len(kwargs["generator"]))  # type: ignore[arg-type]
        return original(pipe, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(type(tiny_engine.pipe), "__call__", counting)
    return calls
