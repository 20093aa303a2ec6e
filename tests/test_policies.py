"""The bot's copy of each server's policy: read once for a burst, fresh after a change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from bot.policies import GuildPolicies
from storage.database import Database
from storage.models import Guild
from tests.conftest import migrated_database

GUILD = 42


@pytest.fixture
async def database(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    async with migrated_database("sqlite", tmp_path, request) as database:
        async with database.session() as session:
            session.add(Guild(id=GUILD, banned_words=["storm"]))
        yield database


def count_statements(database: Database) -> list[str]:
    statements: list[str] = []

    def seen(_connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", seen)
    return statements


async def ban(database: Database, *words: str) -> None:
    async with database.session() as session:
        guild = await session.get_one(Guild, GUILD)
        guild.banned_words = list(words)


async def test_members_asking_at_once_share_one_read(database: Database) -> None:
    policies = GuildPolicies(database)
    statements = count_statements(database)
    guilds = await asyncio.gather(*(policies.get(GUILD) for _ in range(50)))
    assert {tuple(guild.banned_words) for guild in guilds} == {("storm",)}
    assert len(statements) == 1
    await policies.get(GUILD)
    assert len(statements) == 1


async def test_a_change_applies_after_forget_or_the_lifetime(database: Database) -> None:
    now = [0.0]
    policies = GuildPolicies(database, lifetime=10.0, clock=lambda: now[0])
    assert (await policies.get(GUILD)).banned_words == ["storm"]
    await ban(database, "storm", "boat")
    assert (await policies.get(GUILD)).banned_words == ["storm"]  # within its lifetime
    policies.forget(GUILD)  # what /policy does after committing a change
    assert (await policies.get(GUILD)).banned_words == ["storm", "boat"]
    await ban(database)  # made elsewhere: another bot process, say
    now[0] = 9.9
    assert (await policies.get(GUILD)).banned_words == ["storm", "boat"]
    now[0] = 10.1
    assert (await policies.get(GUILD)).banned_words == []
    assert len(policies) == 1


async def test_a_server_without_a_policy_gets_the_defaults(database: Database) -> None:
    policies = GuildPolicies(database)
    guild = await policies.get(7)
    assert guild.banned_words == [] and guild.style_roles == {}
