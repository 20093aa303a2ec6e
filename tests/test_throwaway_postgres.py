"""The throwaway PostgreSQL that the tests start when no server answers."""

from __future__ import annotations

import asyncpg
import pytest

from tests.throwaway_postgres import ThrowawayPostgres, required_bin_dir


async def test_a_throwaway_server_starts_accepts_trust_logins_and_leaves_nothing_behind() -> None:
    server = ThrowawayPostgres(required_bin_dir("the throwaway PostgreSQL's test"))
    url = server.start()
    root = server.root
    try:
        assert url.host == "127.0.0.1" and url.port == server.port and url.username == "postgres"
        connection = await asyncpg.connect(
            url.set(drivername="postgresql").render_as_string(hide_password=False), timeout=10
        )
        try:
            await connection.execute('CREATE DATABASE "scratch"')
            assert await connection.fetchval("SHOW data_directory") == str(server.data_dir)
        finally:
            await connection.close()
    finally:
        server.stop()
    assert root is not None and not root.exists()
    with pytest.raises(OSError):
        await asyncpg.connect(
            url.set(drivername="postgresql").render_as_string(hide_password=False), timeout=5
        )
