"""Choices and autocomplete shared by several slash commands' options."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

if TYPE_CHECKING:
    from bot.app import ImagineBot

ASPECT_RATIOS = [
    app_commands.Choice(name="1:1 square", value="1:1"),
    app_commands.Choice(name="3:2 landscape", value="3:2"),
    app_commands.Choice(name="2:3 portrait", value="2:3"),
    app_commands.Choice(name="4:3 landscape", value="4:3"),
    app_commands.Choice(name="3:4 portrait", value="3:4"),
    app_commands.Choice(name="16:9 wide", value="16:9"),
    app_commands.Choice(name="9:16 tall", value="9:16"),
    app_commands.Choice(name="21:9 cinema", value="21:9"),
]


async def style_choices(
    interaction: discord.Interaction[ImagineBot], current: str
) -> list[app_commands.Choice[str]]:
    """Autocomplete for any style option: the server's styles matching what was typed."""
    names = interaction.client.services.search_styles(interaction.guild_id, current, limit=25)
    return [app_commands.Choice(name=name, value=name) for name in names[:25]]
