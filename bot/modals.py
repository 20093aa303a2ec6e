"""The remix and "try this style" modals, and what their submissions do.

A modal's ``custom_id`` holds ids only. Submissions are answered from the bot's
``on_interaction`` through :func:`answer_modal`, not by ``on_submit``: a modal
that was open while the bot restarted is then handled like any other.

    remix:<generation id>      the generation's prompt and flags, edited: a new generation
    try:<style name>           /imagine pre-filled with a style
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

from bot.image_intake import receive_image
from bot.prompt import asks_for_control
from bot.records import load_generation
from bot.replies import answer_failure, failures_answered, refuse
from bot.submit import (
    parse_text,
    run_prompt,
    submit,
    take_image_link,
    within_rate_limit,
)
from storage.errors import ImagineError
from storage.models import GenerationKind

if TYPE_CHECKING:
    from bot.app import ImagineBot


class _PromptModal(discord.ui.Modal):
    def __init__(self, title: str, custom_id: str, text: str, max_length: int) -> None:
        super().__init__(title=title[:45], custom_id=custom_id, timeout=15 * 60)
        self.prompt: discord.ui.TextInput[_PromptModal] = discord.ui.TextInput(
            label="Prompt and flags",
            style=discord.TextStyle.paragraph,
            default=text[:max_length],
            max_length=max_length,
            custom_id="prompt",
        )
        self.add_item(self.prompt)

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        """Nothing: see the module docstring."""


class RemixModal(_PromptModal):
    """The generation's prompt and flags, to edit; submitted as a new generation."""

    def __init__(self, generation_id: int, text: str) -> None:
        super().__init__("Remix", f"remix:{generation_id}", text, 4000)


class TryModal(_PromptModal):
    """/imagine pre-filled with the style."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"Try {name}", f"try:{name}", text, 1500)


async def remix_submitted(
    interaction: discord.Interaction[ImagineBot], generation_id: int, text: str
) -> None:
    """A remix keeps the image prompt of what it remixes, unless the text starts with the
    link of another image."""
    services = interaction.client.services
    guild_id = interaction.guild_id
    try:
        source = await load_generation(services.database, generation_id)  # it must still exist
        url, text = take_image_link(services, text)
        kept = source.recipe.init_image if url is None else None
        structure = None  # unless the text still asks for a control: the member removed it
        if asks_for_control(text):
            structure = next((c.source_key for c in source.recipe.controls if c.source_key), None)
        recipes = parse_text(
            services,
            text,
            guild_id,
            image=kept,
            image_expected=url is not None,
            control_source=structure,
        )
    except ImagineError as exc:
        await refuse(interaction, str(exc))
        return
    # The remix hangs under the first image of what it remixed, for the web gallery's lineage.
    parent = min(source.images, key=lambda image: image.index).id if source.images else None
    private = source.private  # a private result's remix is answered only to its member
    if url is None:
        await submit(
            interaction, GenerationKind.REMIX, recipes, parent_image_id=parent, private=private
        )
        return
    if not await within_rate_limit(interaction):
        return
    await interaction.response.defer(thinking=True, ephemeral=private)
    try:
        image = await receive_image(services, url=url)
        recipes = parse_text(services, text, guild_id, image=image, control_source=structure)
    except Exception as exc:
        await answer_failure(interaction, exc, "the Remix form")
        return
    await submit(
        interaction,
        GenerationKind.REMIX,
        recipes,
        parent_image_id=parent,
        private=private,
        rate_limited=False,
    )


REMIX = re.compile(r"remix:(?P<id>[0-9]{1,20})")
TRY = re.compile(r"try:(?P<name>[A-Za-z0-9_-]{1,64})")


async def answer_modal(interaction: discord.Interaction[ImagineBot]) -> bool:
    """Handle ``interaction`` if it submits one of these modals; whether it did."""
    if interaction.type is not discord.InteractionType.modal_submit or interaction.data is None:
        return False
    custom_id = str(interaction.data.get("custom_id", ""))
    text = _find_value(interaction.data.get("components", []), "prompt") or ""
    if (remix := REMIX.fullmatch(custom_id)) is not None:
        async with failures_answered(interaction, "the Remix form"):
            await remix_submitted(interaction, int(remix["id"]), text)
    elif TRY.fullmatch(custom_id) is not None:
        async with failures_answered(interaction, "the Try it form"):
            await run_prompt(interaction, text)
    else:
        return False
    return True


def _find_value(node: Any, custom_id: str) -> str | None:
    if isinstance(node, dict):
        if node.get("custom_id") == custom_id and "value" in node:
            return str(node["value"])
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found = _find_value(child, custom_id)
            if found is not None:
                return found
    return None
