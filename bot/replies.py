"""Answering an interaction: an ephemeral sentence, or a rendered message as a followup."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import discord

from storage.errors import ImagineError

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from bot.delivery import Rendered


class Refusal(ImagineError):
    """A sentence for the user, sent ephemerally."""


async def refuse(interaction: discord.Interaction[ImagineBot], message: str) -> None:
    """An ephemeral sentence, whether or not the interaction was answered already."""
    if not interaction.response.is_done():
        await interaction.response.send_message(message, ephemeral=True)
        return
    if interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
        with contextlib.suppress(discord.HTTPException):
            await interaction.delete_original_response()  # the public "thinking…"
    await interaction.followup.send(message, ephemeral=True)


async def send_rendered(interaction: discord.Interaction[ImagineBot], rendered: Rendered) -> None:
    """``rendered`` as a followup of a deferred interaction."""
    await interaction.followup.send(
        content=rendered.content,
        files=rendered.files(),
        view=rendered.view if rendered.view is not None else discord.utils.MISSING,
    )
