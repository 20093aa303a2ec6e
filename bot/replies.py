"""Answering an interaction: an ephemeral sentence, or a rendered message as a followup."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import discord

from storage.database import is_outage
from storage.errors import ImagineError, QueueUnavailable

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from bot.delivery import Rendered

log = logging.getLogger(__name__)
FAULT = (
    "Something went wrong on the bot's side while answering {what}; it is in the bot's log "
    "for its owner. Try again in a moment, and tell them if it happens again."
)


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


async def answer_failure(
    interaction: discord.Interaction[ImagineBot], exc: BaseException, what: str
) -> None:
    """A sentence for whatever ``exc`` is, never "This interaction failed": a refusal's own,
    the queue's for a database that cannot answer now, and for a fault (a bug, logged with
    its traceback) one that says so. ``what`` names the command or button in the log and
    the fault's sentence."""
    if isinstance(exc, ImagineError):
        sentence = str(exc)
    elif is_outage(exc):
        log.warning(
            "%s for user %s: the database cannot answer (%r)", what, interaction.user.id, exc
        )
        sentence = str(QueueUnavailable())
    else:
        log.error("%s failed for user %s", what, interaction.user.id, exc_info=exc)
        sentence = FAULT.format(what=what)
    try:
        await refuse(interaction, sentence)
    except discord.HTTPException as unsent:  # the token expired, or Discord is away
        log.warning("could not tell user %s why %s failed: %s", interaction.user.id, what, unsent)


@contextlib.asynccontextmanager
async def failures_answered(
    interaction: discord.Interaction[ImagineBot], what: str
) -> AsyncIterator[None]:
    """Run a button's or modal's work, answering any failure with :func:`answer_failure`."""
    try:
        yield
    except Exception as exc:
        await answer_failure(interaction, exc, what)


async def send_rendered(interaction: discord.Interaction[ImagineBot], rendered: Rendered) -> None:
    """``rendered`` as a followup of a deferred interaction."""
    await interaction.followup.send(
        content=rendered.content,
        files=rendered.files(),
        view=rendered.view if rendered.view is not None else discord.utils.MISSING,
    )
