"""/styles (browse and try) and /style add|edit|remove (for members who manage the server).

A LoRA uploaded with /style add is checked before anything is kept (see
:mod:`storage.style_store`), stored in the blob store, and previewed: a
fixed-seed generation with the new style runs at once and its image becomes the
style's preview in /styles.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.choices import style_choices
from bot.delivery import Rendered
from bot.modals import TryModal
from bot.prompt import PromptOverrides
from bot.replies import failures_answered, refuse
from bot.services import Services
from bot.submit import parse_text, submit
from bot.uploads import fit_upload
from storage.errors import ImagineError
from storage.generations import get_generation
from storage.models import GenerationKind, GenerationStatus, Style
from storage.style_store import (
    add_style,
    check_family,
    check_rank,
    check_style_name,
    check_upload,
    guild_styles,
    inspect_lora,
    server_style,
)

if TYPE_CHECKING:
    from bot.app import ImagineBot

PREVIEW_SEED = 1234
_NOT_PLAIN = re.compile(r"[{}]|(?<!\S)[-—]+")  # what the prompt language reads as groups, flags
PAGE_TEMPLATE = r"sty:(?P<page>[0-9]{1,5}):(?P<action>prev|next)"
TRY_TEMPLATE = r"stt:(?P<name>[A-Za-z0-9_-]{1,64})"
_BUTTON = discord.ui.Button[Any]


def preview_prompt(trigger_words: Sequence[str], description: str, name: str) -> str:
    """The prompt of a style's preview: its trigger words and description (or else its
    name) as plain text, without the braces and word-initial dashes that the prompt
    language would read as permutations and flags."""
    text = _NOT_PLAIN.sub(" ", ", ".join([*trigger_words, description or name]))
    plain = " ".join(text.split()).strip(", ")
    return plain or name


@dataclass(frozen=True)
class StyleEntry:
    name: str
    description: str
    trigger_words: tuple[str, ...]
    default_weight: float
    where: str  # "server" or "global"
    preview_generation_id: int | None = None
    preview_path: Path | None = None


class StylePageButton(discord.ui.DynamicItem[_BUTTON], template=PAGE_TEMPLATE):
    def __init__(self, page: int, action: str, *, disabled: bool = False) -> None:
        self.page = page
        self.action = action
        super().__init__(
            discord.ui.Button(
                label="◀ Previous" if action == "prev" else "Next ▶",
                style=discord.ButtonStyle.secondary,
                custom_id=f"sty:{page}:{action}",
                disabled=disabled,
            )
        )

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
    ) -> StylePageButton:
        return cls(int(match["page"]), match["action"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        page = self.page - 1 if self.action == "prev" else self.page + 1
        async with failures_answered(interaction, "the styles' page button"):
            await show_page(interaction, max(0, page), edit=True)


class TryStyleButton(discord.ui.DynamicItem[_BUTTON], template=TRY_TEMPLATE):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            discord.ui.Button(
                label="Try it",
                emoji="✨",
                style=discord.ButtonStyle.success,
                custom_id=f"stt:{name}",
            )
        )

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
    ) -> TryStyleButton:
        return cls(match["name"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        async with failures_answered(interaction, "the Try it button"):
            await open_try(interaction, self.name)


def _page_view(page: int, count: int, name: str | None) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(StylePageButton(page, "prev", disabled=page == 0))
    if name is not None:
        view.add_item(TryStyleButton(name))
    view.add_item(StylePageButton(page, "next", disabled=page + 1 >= count))
    view.stop()
    return view


# -- /styles --------------------------------------------------------------------------------


async def style_entries(services: Services, guild_id: int | None) -> list[StyleEntry]:
    found: dict[str, StyleEntry] = {}
    registry: Any = services.styles
    for name in registry.names():
        spec = registry.get(name)
        found[name] = StyleEntry(
            name,
            spec.description,
            tuple(spec.trigger_words),
            spec.default_weight,
            "global",
            preview_path=spec.preview_path,
        )
    if guild_id is not None:
        async with services.database.session() as session:
            for row in await guild_styles(session, guild_id):
                found[row.name] = StyleEntry(
                    row.name,
                    row.description,
                    tuple(row.trigger_words),
                    row.default_weight,
                    "server",
                    preview_generation_id=row.preview_generation_id,
                )
    return sorted(found.values(), key=lambda entry: entry.name)


async def render_page(services: Services, guild_id: int | None, page: int, limit: int) -> Rendered:
    entries = await style_entries(services, guild_id)
    if not entries:
        text = "🎨 No styles yet. Members who manage the server can add one with /style add."
        return Rendered(text, view=_page_view(0, 0, None))
    page = min(page, len(entries) - 1)
    entry = entries[page]
    triggers = ", ".join(entry.trigger_words) or "none"
    content = (
        f"🎨 **{entry.name}** ({entry.where}) · {page + 1} of {len(entries)}\n"
        f"{entry.description or 'No description.'}\n"
        f"Trigger words: {triggers} · default weight {entry.default_weight:g}\n"
        f"Use it: `/imagine prompt: … --style {entry.name}`"
    )[:2000]
    rendered = Rendered(content, view=_page_view(page, len(entries), entry.name))
    preview = await _preview(services, entry)
    if preview is not None:
        rendered.upload = fit_upload(preview, f"style-{entry.name}", limit)
    return rendered


async def _preview(services: Services, entry: StyleEntry) -> bytes | None:
    if entry.preview_path is not None and entry.preview_path.is_file():
        return entry.preview_path.read_bytes()
    if entry.preview_generation_id is None:
        return None
    async with services.database.session() as session:
        generation = await get_generation(session, entry.preview_generation_id)
    if generation.status is not GenerationStatus.SUCCEEDED or not generation.images:
        return None
    return await services.blobs.get(generation.images[0].blob_key)


async def show_page(interaction: discord.Interaction[ImagineBot], page: int, *, edit: bool) -> None:
    rendered = await render_page(
        interaction.client.services, interaction.guild_id, page, interaction.filesize_limit
    )
    view = rendered.view or discord.utils.MISSING
    if edit:
        await interaction.response.edit_message(
            content=rendered.content, attachments=rendered.files(), view=view
        )
    else:
        await interaction.followup.send(rendered.content, files=rendered.files(), view=view)


async def open_try(interaction: discord.Interaction[ImagineBot], name: str) -> None:
    known = interaction.client.services.known_styles(interaction.guild_id)
    if name not in known:
        await interaction.response.send_message(
            f"The style {name} is gone; /styles shows the current ones.", ephemeral=True
        )
        return
    await interaction.response.send_modal(TryModal(name, f"a lighthouse at dusk --style {name}"))


class StylesCog(commands.Cog):
    style = app_commands.Group(
        name="style",
        description="Add, change or remove this server's styles",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )

    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.services = bot.services

    @app_commands.command(name="styles", description="This server's styles, with previews.")
    @app_commands.guild_only()
    async def styles(self, interaction: discord.Interaction[ImagineBot]) -> None:
        await interaction.response.defer(thinking=True)
        await show_page(interaction, 0, edit=False)

    # -- /style add | edit | remove -------------------------------------------------------------

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        command = interaction.command
        parent = getattr(command, "parent", None)
        if parent is None or parent.name != "style":
            return True
        if interaction.guild_id is None or not interaction.permissions.manage_guild:
            await interaction.response.send_message(
                "Only members with the Manage Server permission can change styles.",
                ephemeral=True,
            )
            return False
        return True

    @style.command(name="add", description="Add a LoRA style from a .safetensors file.")
    @app_commands.describe(
        file="The LoRA, a .safetensors file",
        name="The style's name: letters, digits, - and _",
        description="What it looks like",
        weight="How strongly it applies by default (0.1 to 2)",
        trigger_words="Words the LoRA was trained on, separated by commas",
    )
    async def add(
        self,
        interaction: discord.Interaction[ImagineBot],
        file: discord.Attachment,
        name: app_commands.Range[str, 1, 64],
        description: app_commands.Range[str, 0, 300] = "",
        weight: app_commands.Range[float, 0.1, 2.0] = 1.0,
        trigger_words: str = "",
    ) -> None:
        assert interaction.guild_id is not None
        family = self.services.family.name
        max_bytes = self.services.settings.max_lora_mb * 2**20
        words = [w.strip() for w in trigger_words.split(",") if w.strip()]
        # Everything that can refuse comes before the blob is stored, so a refusal
        # leaves nothing behind.
        try:
            check_upload(file.filename, file.size, max_bytes)
            await interaction.response.defer(thinking=True)
            async with self.services.database.session() as session:
                await check_style_name(session, interaction.guild_id, name)
            data = await file.read()
            info = inspect_lora(data, file.filename, max_bytes)
            check_family(info, family, file.filename)
            check_rank(info, self.services.settings.lora_max_rank, file.filename)
            key = await self.services.blobs.put(data)
            async with self.services.database.session() as session:
                row = await add_style(
                    session,
                    guild_id=interaction.guild_id,
                    name=name,
                    family=family,
                    lora_blob_key=key,
                    lora_sha256=hashlib.sha256(data).hexdigest(),
                    lora_rank=info.rank,
                    created_by=interaction.user.id,
                    description=description,
                    default_weight=weight,
                    trigger_words=words,
                )
                style_id = row.id
        except ImagineError as exc:
            await refuse(interaction, str(exc))
            return
        self.services.guild_style_weights.setdefault(interaction.guild_id, {})[name] = weight
        added = f"Style **{name}** is added ({info.tensors} LoRA tensors, checked for {family})"
        options = PromptOverrides(seed=PREVIEW_SEED, styles=(name,))
        try:  # the style is stored: a preview that cannot be made must not hide that
            prompt = preview_prompt(words, description, name)
            recipes = parse_text(self.services, prompt, interaction.guild_id, options)
        except ImagineError as exc:
            await interaction.followup.send(
                f"{added}, but its preview could not be made: {exc} Use it with `--style {name}`.",
                ephemeral=True,
            )
            return
        preview = recipes[0].model_copy(update={"count": 1})
        # The moderator's /style add, already answered: its preview is not a member's command.
        generations = await submit(
            interaction, GenerationKind.IMAGINE, [preview], rate_limited=False
        )
        if generations:
            async with self.services.database.session() as session:
                row = await session.get_one(Style, style_id)
                row.preview_generation_id = generations[0].id
        await interaction.followup.send(
            f"{added}; its preview is being made above. Use it with `--style {name}`.",
            ephemeral=True,
        )

    @style.command(
        name="edit", description="Change a style's description, weight or trigger words."
    )
    @app_commands.autocomplete(name=style_choices)
    async def edit(
        self,
        interaction: discord.Interaction[ImagineBot],
        name: str,
        description: app_commands.Range[str, 0, 300] | None = None,
        weight: app_commands.Range[float, 0.1, 2.0] | None = None,
        trigger_words: str | None = None,
    ) -> None:
        assert interaction.guild_id is not None
        try:
            async with self.services.database.session() as session:
                row = await server_style(session, interaction.guild_id, name)
                if description is not None:
                    row.description = description
                if weight is not None:
                    row.default_weight = weight
                if trigger_words is not None:
                    row.trigger_words = [w.strip() for w in trigger_words.split(",") if w.strip()]
        except ImagineError as exc:
            await refuse(interaction, str(exc))
            return
        server = self.services.guild_style_weights.get(interaction.guild_id, {})
        if weight is not None and name in server:  # committed: the next prompt takes it
            server[name] = weight
        await interaction.response.send_message(f"Style **{name}** is updated.", ephemeral=True)

    @style.command(name="remove", description="Remove a style this server added.")
    @app_commands.autocomplete(name=style_choices)
    async def remove(self, interaction: discord.Interaction[ImagineBot], name: str) -> None:
        assert interaction.guild_id is not None
        try:
            async with self.services.database.session() as session:
                row = await server_style(session, interaction.guild_id, name)
                await session.delete(row)
        except ImagineError as exc:
            await refuse(interaction, str(exc))
            return
        self.services.guild_style_weights.get(interaction.guild_id, {}).pop(name, None)
        await interaction.response.send_message(
            f"Style **{name}** is removed; images made with it keep their recipe.",
            ephemeral=True,
        )


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(StylesCog(bot))
    bot.add_dynamic_items(StylePageButton, TryStyleButton)
