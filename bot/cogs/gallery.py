"""/gallery: the server's images, most liked or newest first, one image a page.

Page buttons carry the query (style, sort, period, page) in their ``custom_id``;
like and open buttons carry the image id. Nothing lives in memory, so a gallery
message keeps working after restarts, and paging never shows more than one
attachment and two rows of buttons.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.choices import style_choices, style_refusal
from bot.delivery import Rendered
from bot.records import load_image
from bot.replies import failures_answered, send_rendered
from bot.submit import nsfw_shown_here
from bot.web_links import gallery_link
from storage.gallery import GalleryEntry, GallerySort, gallery_page, toggle_like
from storage.generations import get_generation
from storage.models import utcnow

if TYPE_CHECKING:
    from bot.app import ImagineBot

PERIODS = {"day": timedelta(days=1), "week": timedelta(days=7), "all": None}
PAGE_TEMPLATE = (
    r"gal:(?P<style>[A-Za-z0-9_-]{0,64}):(?P<sort>top|new):(?P<period>day|week|all)"
    r":(?P<page>[0-9]{1,5}):(?P<action>prev|next)"
)
IMAGE_TEMPLATE = r"gim:(?P<id>[0-9]{1,20}):(?P<action>like|open)"
_BUTTON = discord.ui.Button[Any]


class GalleryPageButton(discord.ui.DynamicItem[_BUTTON], template=PAGE_TEMPLATE):
    def __init__(
        self, style: str, sort: str, period: str, page: int, action: str, *, disabled: bool = False
    ) -> None:
        self.query = (style, sort, period)
        self.page = page
        self.action = action
        label = "◀ Previous" if action == "prev" else "Next ▶"
        super().__init__(
            discord.ui.Button(
                label=label,
                style=discord.ButtonStyle.secondary,
                custom_id=f"gal:{style}:{sort}:{period}:{page}:{action}",
                disabled=disabled,
                row=0,
            )
        )

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
    ) -> GalleryPageButton:
        return cls(
            match["style"], match["sort"], match["period"], int(match["page"]), match["action"]
        )

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        target = self.page - 1 if self.action == "prev" else self.page + 1
        async with failures_answered(interaction, "the gallery's page button"):
            await show_page(interaction, *self.query, max(0, target), edit=True)


class GalleryImageButton(discord.ui.DynamicItem[_BUTTON], template=IMAGE_TEMPLATE):
    def __init__(self, image_id: int, action: str, likes: int = 0) -> None:
        self.image_id = image_id
        self.action = action
        look: dict[str, Any] = (
            {"emoji": "❤️", "label": str(likes), "style": discord.ButtonStyle.primary}
            if action == "like"
            else {"label": "Open", "style": discord.ButtonStyle.success}
        )
        super().__init__(discord.ui.Button(custom_id=f"gim:{image_id}:{action}", row=0, **look))

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
    ) -> GalleryImageButton:
        return cls(int(match["id"]), match["action"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        async with failures_answered(interaction, f"the gallery's {self.action} button"):
            if self.action == "like":
                await like(interaction, self.image_id)
            else:
                await open_image(interaction, self.image_id)


def page_view(
    style: str, sort: str, period: str, page: int, entry: GalleryEntry | None, has_next: bool
) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(GalleryPageButton(style, sort, period, page, "prev", disabled=page == 0))
    if entry is not None:
        view.add_item(GalleryImageButton(entry.image.id, "like", entry.like_count))
        view.add_item(GalleryImageButton(entry.image.id, "open"))
    view.add_item(GalleryPageButton(style, sort, period, page, "next", disabled=not has_next))
    view.stop()  # dispatched by template, not kept per message
    return view


def _caption(style: str, sort: str, period: str, page: int, entry: GalleryEntry) -> str:
    where = f"`{style}` " if style else ""
    prompt = entry.prompt if len(entry.prompt) <= 300 else entry.prompt[:297] + "..."
    return (
        f"🖼️ Gallery {where}· {sort} · {'all time' if period == 'all' else 'past ' + period} · "
        f"#{page + 1}\n**{prompt}** — <@{entry.requester_id}> · ❤️ {entry.like_count} · "
        f"image {entry.image.id} of #{entry.generation_id}"
    )[:2000]


async def render_page(
    bot: ImagineBot,
    guild_id: int | None,
    style: str,
    sort: str,
    period: str,
    page: int,
    limit: int,
    *,
    nsfw: bool,
) -> Rendered:
    """Page ``page`` of the gallery, one image; the images of NSFW prompts only if ``nsfw``
    (the channel may show them)."""
    span = PERIODS[period]
    async with bot.services.database.session() as session:
        found = await gallery_page(
            session,
            style=style or None,
            sort=GallerySort(sort),
            since=utcnow() - span if span is not None else None,
            page=page,
            page_size=1,
            guild_id=guild_id,
            nsfw=nsfw,
        )
    if not found.entries:
        text = (
            "🖼️ No images here yet: make some with /imagine."
            if page == 0
            else "🖼️ That was the last one."
        )
        return Rendered(text, view=page_view(style, sort, period, page, None, False))
    entry = found.entries[0]
    async with bot.services.database.session() as session:
        generation = await get_generation(session, entry.generation_id)
    rendered = await bot.delivery.render_image(generation, entry.image, limit)
    rendered.content = _caption(style, sort, period, page, entry)
    web = await gallery_link(bot.services, guild_id, sort=sort, period=period, style=style)
    if web is not None:
        rendered.content = f"{rendered.content}\n🌐 All of them on the web: <{web}>"[:2000]
    rendered.view = page_view(style, sort, period, page, entry, found.has_next)
    return rendered


async def show_page(
    interaction: discord.Interaction[ImagineBot],
    style: str,
    sort: str,
    period: str,
    page: int,
    *,
    edit: bool,
) -> None:
    rendered = await render_page(
        interaction.client,
        interaction.guild_id,
        style,
        sort,
        period,
        page,
        interaction.filesize_limit,
        nsfw=await nsfw_shown_here(interaction),
    )
    if edit:
        await interaction.response.edit_message(
            content=rendered.content, attachments=rendered.files(), view=rendered.view
        )
    else:
        await send_rendered(interaction, rendered)


async def like(interaction: discord.Interaction[ImagineBot], image_id: int) -> None:
    database = interaction.client.services.database
    await load_image(database, image_id)  # it must exist
    async with database.session() as session:
        _, count = await toggle_like(session, interaction.user.id, image_id)
    message = interaction.message
    view = discord.ui.View.from_message(message) if message is not None else None
    if view is None:
        await interaction.response.defer()
        return
    fresh = discord.ui.View(timeout=None)
    for item in view.children:
        custom_id = getattr(item, "custom_id", "")
        if custom_id == f"gim:{image_id}:like":
            fresh.add_item(GalleryImageButton(image_id, "like", count))
        else:
            fresh.add_item(item)
    fresh.stop()
    content = message.content if message is not None else ""
    content = re.sub(r"❤️ \d+", f"❤️ {count}", content, count=1)
    await interaction.response.edit_message(content=content, view=fresh)


async def open_image(interaction: discord.Interaction[ImagineBot], image_id: int) -> None:
    image, generation = await load_image(interaction.client.services.database, image_id)
    await interaction.response.defer(thinking=True)
    delivery = interaction.client.delivery
    await send_rendered(
        interaction, await delivery.render_image(generation, image, interaction.filesize_limit)
    )


class GalleryCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.services = bot.services

    @app_commands.command(name="gallery", description="This server's images, most liked first.")
    @app_commands.describe(
        style="Only this style", sort="Most liked or newest", period="How far back"
    )
    @app_commands.choices(
        sort=[
            app_commands.Choice(name="top", value="top"),
            app_commands.Choice(name="new", value="new"),
        ],
        period=[
            app_commands.Choice(name="day", value="day"),
            app_commands.Choice(name="week", value="week"),
            app_commands.Choice(name="all time", value="all"),
        ],
    )
    @app_commands.guild_only()
    @app_commands.autocomplete(style=style_choices)
    async def gallery(
        self,
        interaction: discord.Interaction[ImagineBot],
        style: str | None = None,
        sort: str = "top",
        period: str = "week",
    ) -> None:
        if style and (refusal := style_refusal(interaction, style)) is not None:
            await interaction.response.send_message(refusal, ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        await show_page(interaction, style or "", sort, period, 0, edit=False)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(GalleryCog(bot))
    bot.add_dynamic_items(GalleryPageButton, GalleryImageButton)
