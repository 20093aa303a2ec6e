"""Running the migration history from code (``imagine db …`` and embedded start-up)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL, Connection

from storage.database import Database, describe_url
from storage.errors import ConfigError

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(url: URL) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    # ConfigParser treats % as interpolation; a password may contain one.
    config.set_main_option(
        "sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%")
    )
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config(URL.create("sqlite"))).get_current_head()
    assert head is not None, "the migration history is empty"
    return head


def known_revisions() -> list[str]:
    """Every revision id of the history, oldest first."""
    script = ScriptDirectory.from_config(alembic_config(URL.create("sqlite")))
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


def _migrate(step: Callable[[Config, str], None], url: URL, revision: str) -> None:
    try:
        step(alembic_config(url), revision)
    except CommandError as exc:
        raise ConfigError(
            f"Cannot migrate to revision {revision!r} ({exc}); the known revisions are "
            f"{', '.join(known_revisions())}, plus `head` (the newest) and `base` (empty)."
        ) from None


@dataclass(frozen=True)
class SchemaState:
    database: str
    current: str | None
    head: str

    @property
    def is_current(self) -> bool:
        return self.current == self.head

    def describe(self) -> str:
        if self.current is None:
            where = "empty (no migrations applied); run `imagine db upgrade`"
        elif self.is_current:
            where = f"{self.current} (head)"
        else:
            where = f"{self.current}, behind head {self.head}; run `imagine db upgrade`"
        return f"{self.database}: {where}"


async def upgrade(database: Database, revision: str = "head") -> None:
    await database.check()
    await asyncio.to_thread(_migrate, command.upgrade, database.url, revision)


async def downgrade(database: Database, revision: str) -> None:
    await database.check()
    await asyncio.to_thread(_migrate, command.downgrade, database.url, revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def state(database: Database) -> SchemaState:
    await database.check()
    async with database.engine.connect() as connection:
        current = await connection.run_sync(_current)
    return SchemaState(describe_url(database.url), current, head_revision())
