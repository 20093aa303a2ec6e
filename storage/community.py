"""Personal defaults and server policy: the records behind /settings and /policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.generations import ensure_user
from storage.models import Guild, NsfwPolicy, PolicyChange, User

# What /settings may set, with the type each value must have.
USER_DEFAULTS: dict[str, type] = {
    "style": str,
    "aspect_ratio": str,
    "steps": int,
    "guidance": float,
    "private": bool,
}

# Words that make a prompt NSFW for the server's NSFW policy (on top of its banned words).
NSFW_WORDS = (
    "nsfw",
    "nude",
    "nudity",
    "naked",
    "porn",
    "pornographic",
    "sex",
    "explicit",
    "topless",
    "hentai",
    "porno",
    "erotic",
)


async def user_defaults(session: AsyncSession, user_id: int) -> dict[str, Any]:
    user = await session.get(User, user_id)
    return dict(user.settings or {}) if user is not None else {}


async def all_user_defaults(session: AsyncSession) -> dict[int, dict[str, Any]]:
    """Every user who set a default, for the bot's in-memory copy."""
    rows = await session.execute(select(User.id, User.settings))
    return {user_id: dict(values) for user_id, values in rows if values}


async def set_user_defaults(session: AsyncSession, user_id: int, **values: Any) -> dict[str, Any]:
    """Set the given defaults (``None`` leaves one as it is); returns all of them."""
    unknown = set(values) - set(USER_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown defaults: {sorted(unknown)}")
    user = await ensure_user(session, user_id)
    merged = dict(user.settings or {})
    for key, value in values.items():
        if value is not None:
            merged[key] = USER_DEFAULTS[key](value)
    user.settings = merged
    await session.flush()
    return merged


async def reset_user_defaults(
    session: AsyncSession, user_id: int, key: str | None = None
) -> dict[str, Any]:
    """Forget the default ``key`` (every default if ``None``); returns those left."""
    if key is not None and key not in USER_DEFAULTS:
        raise ValueError(f"unknown default: {key!r}")
    user = await ensure_user(session, user_id)
    left = {name: value for name, value in (user.settings or {}).items() if key not in (None, name)}
    user.settings = left
    await session.flush()
    return left


async def guild_policy(session: AsyncSession, guild_id: int) -> Guild:
    """The server's policy row; a default one (not yet stored) if it never set any."""
    guild = await session.get(Guild, guild_id)
    if guild is None:
        guild = Guild(
            id=guild_id,
            banned_words=[],
            nsfw_policy=NsfwPolicy.AGE_RESTRICTED_CHANNELS,
            style_roles={},
            web_enabled=False,
            web_nsfw=False,
        )
    return guild


async def change_policy(
    session: AsyncSession,
    guild_id: int,
    user_id: int,
    change: str,
    apply: Callable[[Guild], None],
) -> Guild:
    """Apply ``apply`` to the server's policy and record who changed what."""
    guild = await session.get(Guild, guild_id)
    if guild is None:
        guild = Guild(
            id=guild_id,
            banned_words=[],
            nsfw_policy=NsfwPolicy.AGE_RESTRICTED_CHANNELS,
            style_roles={},
            web_enabled=False,
            web_nsfw=False,
        )
        session.add(guild)
    apply(guild)
    guild.updated_by = user_id
    session.add(PolicyChange(guild_id=guild_id, user_id=user_id, change=change))
    await session.flush()
    return guild


async def policy_changes(
    session: AsyncSession, guild_id: int, limit: int = 10
) -> list[PolicyChange]:
    rows = await session.scalars(
        select(PolicyChange)
        .where(PolicyChange.guild_id == guild_id)
        .order_by(PolicyChange.at.desc(), PolicyChange.id.desc())
        .limit(limit)
    )
    return list(rows)
