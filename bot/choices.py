"""Choices and autocomplete shared by several slash commands' options."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

from storage.families import ASPECT_RATIOS as COMMON_RATIOS
from storage.recipe import unknown_style_message

if TYPE_CHECKING:
    from bot.app import ImagineBot

_RATIO_NAMES = {
    (1, 1): "square",
    (3, 2): "landscape",
    (2, 3): "portrait",
    (4, 3): "landscape",
    (3, 4): "portrait",
    (16, 9): "wide",
    (9, 16): "tall",
    (21, 9): "cinema",
}
ASPECT_RATIOS = [
    app_commands.Choice(name=f"{w}:{h} {_RATIO_NAMES[w, h]}", value=f"{w}:{h}")
    for w, h in COMMON_RATIOS
]


async def style_choices(
    interaction: discord.Interaction[ImagineBot], current: str
) -> list[app_commands.Choice[str]]:
    """Autocomplete for any style option: the server's styles matching what was typed."""
    names = interaction.client.services.search_styles(interaction.guild_id, current, limit=25)
    return [app_commands.Choice(name=name, value=name) for name in names[:25]]


def style_refusal(interaction: discord.Interaction[ImagineBot], name: str) -> str | None:
    """Why a style option names no style of this server's (the folder's and its own), or
    ``None`` when it does."""
    known = interaction.client.services.known_styles(interaction.guild_id)
    if name in known:
        return None
    return unknown_style_message(name, known)[0]
