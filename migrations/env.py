"""Alembic environment: async engines, batch mode so SQLite can alter tables."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from migrations.env_names import include_name
from storage.database import create_engine, parse_database_url
from storage.models import Base
from storage.settings import load_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url or load_settings().resolved_database_url


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        include_name=include_name,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        # Batch mode rebuilds a SQLite table by copying it and dropping the old one; with
        # foreign keys on, that DROP deletes every row referencing it through ON DELETE
        # CASCADE (rebuilding generations emptied images and likes). Set before any BEGIN:
        # SQLite ignores this pragma inside a transaction.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_sync(connection)
        return
    engine = create_engine(parse_database_url(_url()))
    try:
        async with engine.connect() as async_connection:
            await async_connection.run_sync(_run_sync)
            await async_connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
