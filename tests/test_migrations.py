"""The migration history: up and down on both databases, and in step with the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from migrations import runner
from storage.database import Database
from storage.models import Base

TABLES = {
    "users",
    "guilds",
    "generations",
    "generation_styles",
    "images",
    "styles",
    "likes",
    "blobs",
    "workers",
    "policy_changes",
    "thumbnails",
}


def _tables(connection: Connection) -> set[str]:
    names = set(inspect(connection).get_table_names()) - {"alembic_version"}
    return {name for name in names if not name.startswith("procrastinate_")}


def _procrastinate_tables(connection: Connection) -> set[str]:
    return {n for n in inspect(connection).get_table_names() if n.startswith("procrastinate_")}


def _differences(connection: Connection) -> list[object]:
    from migrations.env_names import include_name

    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_name": include_name}
    )
    return list(compare_metadata(context, Base.metadata))


async def test_upgrade_from_empty_to_head_and_back_to_base(empty_database: Database) -> None:
    assert (await runner.state(empty_database)).current is None

    await runner.upgrade(empty_database)
    state = await runner.state(empty_database)
    assert state.is_current and state.current == runner.head_revision()
    async with empty_database.engine.connect() as connection:
        assert await connection.run_sync(_tables) == TABLES
        queue_tables = await connection.run_sync(_procrastinate_tables)
    if empty_database.backend == "postgresql":
        assert "procrastinate_jobs" in queue_tables
    else:
        assert queue_tables == set()

    await runner.downgrade(empty_database, "base")
    assert (await runner.state(empty_database)).current is None
    async with empty_database.engine.connect() as connection:
        assert await connection.run_sync(_tables) == set()
        assert await connection.run_sync(_procrastinate_tables) == set()

    await runner.upgrade(empty_database)
    assert (await runner.state(empty_database)).is_current


async def test_models_and_migration_history_agree(database: Database) -> None:
    async with database.engine.connect() as connection:
        differences = await connection.run_sync(_differences)
    assert differences == [], f"run `alembic revision --autogenerate`: {differences}"


async def test_state_describes_what_to_do(empty_database: Database) -> None:
    described = (await runner.state(empty_database)).describe()
    assert "run `imagine db upgrade`" in described


async def test_0002_fills_in_the_model_of_existing_jobs(empty_database: Database) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import text

    now = datetime(2026, 11, 22, tzinfo=UTC)
    await runner.upgrade(empty_database, "0001")
    recipe = (
        '{"model": "old/model", "prompt": "p", "seed": 1, "width": 64, "height": 64, '
        '"steps": 1, "guidance": 1.0}'
    )
    async with empty_database.session() as session:
        await session.execute(
            text("INSERT INTO users (id, settings, created_at) VALUES (1, '{}', :now)"),
            {"now": now},
        )
        await session.execute(
            text(
                "INSERT INTO generations (kind, requester_id, recipe, status, priority, attempts,"
                " queued_at) VALUES ('imagine', 1, :recipe, 'queued', 0, 0, :now)"
            ),
            {"recipe": recipe, "now": now},
        )
    await runner.upgrade(empty_database)
    async with empty_database.session() as session:
        assert (await session.execute(text("SELECT model FROM generations"))).scalar() == (
            "old/model"
        )


async def test_0010_keeps_existing_servers_off_the_web_and_their_generations_public(
    empty_database: Database,
) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import text

    now = datetime(2026, 11, 27, tzinfo=UTC)
    await runner.upgrade(empty_database, "0009")
    async with empty_database.session() as session:
        await session.execute(
            text(
                "INSERT INTO guilds (id, banned_words, nsfw_policy, updated_at) "
                "VALUES (7, '[]', 'allow', :now)"
            ),
            {"now": now},
        )
        await session.execute(
            text("INSERT INTO users (id, settings, created_at) VALUES (1, '{}', :now)"),
            {"now": now},
        )
        await session.execute(
            text(
                "INSERT INTO generations (kind, requester_id, guild_id, recipe, model, status,"
                " priority, attempts, queued_at) VALUES ('imagine', 1, 7, :recipe, 'm',"
                " 'succeeded', 0, 0, :now)"
            ),
            {
                "recipe": '{"model": "m", "prompt": "p", "seed": 1, "width": 64, "height": 64, '
                '"steps": 1, "guidance": 1.0}',
                "now": now,
            },
        )
    await runner.upgrade(empty_database)
    async with empty_database.session() as session:
        guild = (await session.execute(text("SELECT web_enabled, web_nsfw FROM guilds"))).one()
        generation = (await session.execute(text("SELECT private, nsfw FROM generations"))).one()
    assert tuple(guild) == (False, False) and tuple(generation) == (False, False)
    await runner.downgrade(empty_database, "0009")
    async with empty_database.engine.connect() as connection:
        assert "thumbnails" not in await connection.run_sync(_tables)


async def test_0010_and_0011_keep_images_and_likes_and_count_them(
    empty_database: Database,
) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import text

    now = datetime(2026, 11, 27, tzinfo=UTC)
    # From before 0010: rebuilding a SQLite table for it once deleted every image and like.
    await runner.upgrade(empty_database, "0009")
    async with empty_database.session() as session:
        for user in (1, 2):
            await session.execute(
                text("INSERT INTO users (id, settings, created_at) VALUES (:id, '{}', :now)"),
                {"id": user, "now": now},
            )
        await session.execute(
            text(
                "INSERT INTO generations (id, kind, requester_id, recipe, model, status,"
                " priority, attempts, queued_at) VALUES (1, 'imagine', 1, '{}', 'm',"
                " 'succeeded', 0, 0, :now)"
            ),
            {"now": now},
        )
        for image in (1, 2):
            await session.execute(
                text(
                    'INSERT INTO images (id, generation_id, "index", seed, width, height,'
                    " blob_key, sha256, created_at)"
                    " VALUES (:id, 1, :index, 1, 64, 64, 'k', 'k', :now)"
                ),
                {"id": image, "index": image - 1, "now": now},
            )
        for user in (1, 2):
            await session.execute(
                text("INSERT INTO likes (user_id, image_id, created_at) VALUES (:user, 2, :now)"),
                {"user": user, "now": now},
            )
    await runner.upgrade(empty_database)
    async with empty_database.session() as session:
        counts = (await session.execute(text("SELECT id, like_count FROM images"))).all()
    assert sorted(tuple(row) for row in counts) == [(1, 0), (2, 2)]
    await runner.downgrade(empty_database, "0009")
    async with empty_database.session() as session:
        likes = (await session.execute(text("SELECT user_id, image_id FROM likes"))).all()
        images = (await session.execute(text("SELECT * FROM images ORDER BY id"))).mappings()
        rows = [dict(row) for row in images]
    assert sorted(tuple(row) for row in likes) == [(1, 2), (2, 2)]
    assert [row["id"] for row in rows] == [1, 2] and "like_count" not in rows[0]


async def test_0012_allows_outpaint_generations_and_a_downgrade_keeps_them(
    empty_database: Database,
) -> None:
    from datetime import UTC, datetime

    import pytest
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    now = datetime(2026, 11, 27, tzinfo=UTC)
    insert = text(
        "INSERT INTO generations (id, kind, requester_id, recipe, model, status,"
        " priority, attempts, queued_at) VALUES (:id, 'outpaint', 1, '{}', 'm',"
        " 'succeeded', 0, 0, :now)"
    )
    await runner.upgrade(empty_database, "0011")
    async with empty_database.session() as session:
        await session.execute(
            text("INSERT INTO users (id, settings, created_at) VALUES (1, '{}', :now)"),
            {"now": now},
        )
    with pytest.raises(IntegrityError):  # the CHECK of kinds before 0012
        async with empty_database.session() as session:
            await session.execute(insert, {"id": 1, "now": now})
    await runner.upgrade(empty_database)
    async with empty_database.session() as session:
        await session.execute(insert, {"id": 2, "now": now})
    await runner.downgrade(empty_database, "0011")
    async with empty_database.session() as session:
        kinds = (await session.execute(text("SELECT id, kind FROM generations"))).all()
    assert [tuple(row) for row in kinds] == [(2, "variation")]


async def test_0013_leaves_the_rank_of_existing_styles_to_fill_in_and_a_downgrade_keeps_them(
    empty_database: Database,
) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import text

    await runner.upgrade(empty_database, "0012")
    async with empty_database.session() as session:
        await session.execute(
            text(
                "INSERT INTO styles (id, guild_id, name, description, lora_blob_key,"
                " default_weight, trigger_words, prompt_template, negative_template,"
                " base_model_family, enabled, created_at) VALUES (1, 5, 'neon', '', 'k', 1.0,"
                " '[]', '{prompt}', '{negative}', 'sd15', :yes, :now)"
            ),
            {"now": datetime(2026, 11, 27, tzinfo=UTC), "yes": True},
        )
    await runner.upgrade(empty_database)
    async with empty_database.session() as session:
        rows = (await session.execute(text("SELECT name, lora_rank FROM styles"))).all()
        assert [tuple(row) for row in rows] == [("neon", None)]  # a worker fills it in
        await session.execute(text("UPDATE styles SET lora_rank = 16"))
    await runner.downgrade(empty_database, "0012")
    async with empty_database.session() as session:
        styles = (await session.execute(text("SELECT * FROM styles"))).mappings().all()
    assert [row["name"] for row in styles] == ["neon"] and "lora_rank" not in styles[0]
