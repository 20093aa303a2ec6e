"""``import bot`` and ``import storage`` must not pull in torch or diffusers."""

from __future__ import annotations

import subprocess
import sys

CHECK = (
    "import sys, bot, bot.cli, storage, storage.models, storage.database, storage.gallery, "
    "storage.generations, storage.blobs, migrations.runner, bot.prompt, bot.deployment, "
    "storage.deployment, storage.events, storage.queue, storage.pg_events, "
    "storage.scaled_queue, bot.services, bot.cli.queue, bot.cli.discord_commands, "
    "bot.cli.local, generation.styles, bot.app, bot.cogs.imagine, bot.delivery, bot.views, "
    "bot.uploads, storage.derive, generation.grid, generation.metadata; "
    "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]; "
    "print(','.join(heavy))"
)


def test_bot_and_storage_do_not_import_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""


def test_the_embedded_bot_path_loads_no_postgresql_driver() -> None:
    """Events, delivery and the deployment itself are driver-free; asyncpg, psycopg and
    procrastinate come in only when a scaled deployment is opened."""
    check = (
        "import sys, bot.app, bot.delivery, bot.deployment, bot.cli.discord_commands, "
        "storage.events, storage.queue; "
        "print(','.join(m for m in ('asyncpg', 'psycopg', 'procrastinate') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
