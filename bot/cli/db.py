"""``imagine db upgrade | downgrade | current``."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from storage.database import Database
from storage.settings import load_settings


def register(commands: Any) -> None:
    db = commands.add_parser("db", help="migrate and inspect the database")
    actions = db.add_subparsers(title="actions", metavar="ACTION", required=True)

    upgrade = actions.add_parser("upgrade", help="apply migrations (default: up to head)")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(handler=_upgrade)

    downgrade = actions.add_parser("downgrade", help="revert migrations down to a revision")
    downgrade.add_argument("revision", help="a revision id, or 'base' to remove everything")
    downgrade.set_defaults(handler=_downgrade)

    current = actions.add_parser("current", help="show the database's migration revision")
    current.set_defaults(handler=_current)


async def _with_database(action: str, revision: str | None = None) -> int:
    from migrations import runner

    database = Database.from_settings(load_settings())
    try:
        if action == "upgrade":
            assert revision is not None
            await runner.upgrade(database, revision)
        elif action == "downgrade":
            assert revision is not None
            await runner.downgrade(database, revision)
        state = await runner.state(database)
    finally:
        await database.dispose()
    print(state.describe())
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    return asyncio.run(_with_database("upgrade", args.revision))


def _downgrade(args: argparse.Namespace) -> int:
    return asyncio.run(_with_database("downgrade", args.revision))


def _current(args: argparse.Namespace) -> int:
    return asyncio.run(_with_database("current"))
