"""Embedded mode with its SQLite file locked by another program (a backup, a second
writer): a member is told to try again, and the bot and its worker carry on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from generation.engine import Engine
from storage.errors import QueueUnavailable
from storage.models import GenerationStatus
from tests.test_bot import make_harness


async def test_a_locked_database_gets_a_sentence_and_the_next_imagine_works(
    tmp_path: Path,
    tiny_engine: Engine,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IMAGINE_SQLITE_BUSY_TIMEOUT", "0.3")
    async with make_harness(tmp_path, tiny_engine, request) as harness:
        await harness.start_worker()
        await harness.start_bot()
        assert harness.database.url.database is not None
        locker = sqlite3.connect(harness.database.url.database, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")  # every other writer waits, then gives up
            refused = await harness.imagine("a cat --steps 2 --seed 5")
            said = await harness.fake.wait_for(
                lambda: harness.fake.said_privately(refused), what="a sentence"
            )
            assert said == QueueUnavailable.MESSAGE
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert await harness.generations() == []

        accepted = await harness.imagine("a cat --steps 2 --seed 5")
        await harness.result(accepted)
        [generation] = await harness.generations()
        assert generation.status is GenerationStatus.SUCCEEDED
        assert generation.delivered_at is not None
