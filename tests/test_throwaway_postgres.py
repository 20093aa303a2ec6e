"""The throwaway PostgreSQL that the tests start when no server answers."""

from __future__ import annotations

import os

import asyncpg
import pytest

from tests.throwaway_postgres import ThrowawayPostgres, server_bin_dir


async def test_a_throwaway_server_starts_accepts_trust_logins_and_leaves_nothing_behind() -> None:
    bin_dir = server_bin_dir()
    if bin_dir is None:
        reason = "no PostgreSQL server is installed (Debian/Ubuntu: apt-get install postgresql)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI must check the throwaway PostgreSQL: {reason}.")
        pytest.skip(reason)
    server = ThrowawayPostgres(bin_dir)
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
