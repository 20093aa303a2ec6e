"""``/imagine`` and what follows it: the grid and image buttons, and the queue commands.

Every handler answers within Discord's 3 s: text is parsed before the first
await (see :mod:`bot.submit`), then the interaction is deferred and the
database work follows. Every user error is an ephemeral sentence saying what
to change.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.choices import ASPECT_RATIOS, style_choices
from bot.delivery import MAX_CONTENT
from bot.modals import RemixModal
from bot.prompt import PromptOverrides, format_recipe
from bot.records import load_generation, load_image
from bot.replies import Refusal, failures_answered, refuse, send_rendered
from bot.submit import (
    Order,
    defer_within_rate_limit,
    from_private_reply,
    nsfw_refusal,
    run_prompt,
    submit_order,
)
from bot.views import (
    GRID_TEMPLATE,
    IMAGE_TEMPLATE,
    PANS,
    ZOOMS,
    grid_button,
    image_button,
    image_view,
)
from bot.web_links import image_link
from storage.derive import (
    family_of,
    outpaint_recipe,
    pan_margins,
    remix_base,
    reroll_recipe,
    upscale_recipe,
    variation_recipe,
    zoom_margins,
)
from storage.errors import ImagineError
from storage.gallery import remove_from_gallery, toggle_like
from storage.generations import recent_generations
from storage.models import Generation, GenerationKind, GenerationStatus, Image
from storage.recipe import MAX_SEED

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from storage.database import Database

S = GenerationStatus


def can_manage_messages(interaction: discord.Interaction[ImagineBot]) -> bool:
    return bool(interaction.permissions.manage_messages)


def moderates(interaction: discord.Interaction[ImagineBot], generation: Generation) -> bool:
    """Whether the member may act on someone else's generation: Manage Messages counts only
    in the server the generation was made in, never in another one or in a DM."""
    return (
        generation.guild_id is not None
        and generation.guild_id == interaction.guild_id
        and can_manage_messages(interaction)
    )


def describe(
    generation: Generation, image: Image | None = None, footer: str = ""
) -> tuple[str, list[discord.File]]:
    """A generation's (or one of its images') recipe, as text that reproduces it, then
    ``footer``. A prompt to reproduce it too long for the message comes whole as a text
    file instead, never cut."""
    recipe = generation.recipe
    if image is not None:
        recipe = recipe.model_copy(update={"seed": image.seed})
    lines = [
        f"**Generation {generation.id}** ({generation.kind.value}, {generation.status.value}) "
        f"by <@{generation.requester_id}>",
    ]
    if image is not None:
        lines.append(f"Image {image.id}: {image.width}×{image.height}, seed {image.seed}")
    lines.append(
        f"Model: `{recipe.model}`" + (f" ({recipe.model_family})" if recipe.model_family else "")
    )
    if recipe.strength is not None and recipe.source_image_id is not None:
        lines.append(f"Strength {recipe.strength} from image {recipe.source_image_id}")
    if recipe.init_image is not None:
        ref = recipe.init_image
        lines.append(
            f"Image prompt: {ref.width}×{ref.height}, sha256 `{ref.sha256[:16]}…`, "
            f"--iw {recipe.image_weight:g} (strength {recipe.strength:g})"
        )
    for number, control in enumerate(recipe.controls, start=1):
        made_by = control.preprocessor or "its preprocessor"
        how = "the image as its map" if control.raw else f"a map by {made_by}"
        stored = f" (`{control.map_key[:16]}…`, attached)" if control.map_key else ""
        lines.append(
            f"Control {number}: {control.type}, weight {control.weight:g}, steps "
            f"{control.start:g}–{control.end:g}, {how}{stored}"
        )
    head, reproduce = "\n".join(lines), format_recipe(recipe)
    text = f"{head}\nPrompt to reproduce it:\n```\n{reproduce}\n```{footer}"
    if len(text) <= MAX_CONTENT:
        return text, []
    name = f"recipe-{generation.id}.txt"
    attached = f"{head}\nPrompt to reproduce it: attached as {name} (too long for a message)."
    file = discord.File(io.BytesIO(reproduce.encode()), filename=name)
    return f"{attached[: MAX_CONTENT - len(footer)]}{footer}", [file]


# -- the buttons under a grid -----------------------------------------------------------------


class GridButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=GRID_TEMPLATE):
    def __init__(self, generation_id: int, action: str) -> None:
        self.generation_id = generation_id
        self.action = action
        super().__init__(grid_button(generation_id, action))

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
    ) -> GridButton:
        return cls(int(match["id"]), match["action"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        async with failures_answered(interaction, f"the {self.action.upper()} button"):
            await grid_action(interaction, self.generation_id, self.action)


async def grid_action(
    interaction: discord.Interaction[ImagineBot], generation_id: int, action: str
) -> None:
    database = interaction.client.services.database
    if action == "remix":  # a modal must be the first response, so it is read first
        generation = await load_generation(database, generation_id)
        text = format_recipe(remix_base(generation.recipe))
        await interaction.response.send_modal(RemixModal(generation_id, text))
        return
    if action[0] == "u":
        await _post_tile(interaction, generation_id, int(action[1:]))
        return

    async def order() -> Order:
        generation = await load_generation(database, generation_id)
        # What is made from a private result stays off the web too.
        if action == "reroll":
            recipes = [reroll_recipe(generation.recipe)]
            return Order(GenerationKind.REROLL, recipes, private=generation.private)
        image = _tile(generation, int(action[1:]))
        recipe = variation_recipe(generation.recipe, image, strong=True)
        return Order(GenerationKind.VARIATION, [recipe], image.id, generation.private)

    await submit_order(interaction, order, ephemeral=from_private_reply(interaction))


async def load_visible(
    database: Database, interaction: discord.Interaction[Any], generation_id: int
) -> Generation:
    """A generation by its number for ``/info`` and ``/show``: one made in this server, or
    any of the member's own (their images follow them); a private one (made with
    ``/settings private``) only for the member who made it."""
    found = await load_generation(database, generation_id)
    if found.requester_id == interaction.user.id:
        return found
    if found.private:
        raise Refusal(
            f"Generation {generation_id} is private: only the member who made it can see it."
        )
    if found.guild_id is None or found.guild_id != interaction.guild_id:
        # Ids are sequential: without this, any number would show another server's images.
        raise Refusal(
            f"Generation {generation_id} was made in another server or a direct message: only "
            "the member who made it can see it here."
        )
    return found


async def _post_tile(
    interaction: discord.Interaction[ImagineBot], generation_id: int, number: int
) -> None:
    """U1-U4: the tile as an image of its own, with its buttons."""
    if not await defer_within_rate_limit(interaction):
        return
    bot = interaction.client
    async with bot.submitting:  # a burst takes turns for connections
        generation = await load_generation(bot.services.database, generation_id)
        image = _tile(generation, number)
        rendered = await bot.delivery.render_image(generation, image, interaction.filesize_limit)
    await send_rendered(interaction, rendered)


def _tile(generation: Generation, number: int) -> Image:
    images = sorted(generation.images, key=lambda image: image.index)
    if not 1 <= number <= len(images):
        raise Refusal(f"Generation {generation.id} has {len(images)} images, not {number}.")
    return images[number - 1]


# -- the buttons under one image --------------------------------------------------------------


class ImageButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=IMAGE_TEMPLATE):
    def __init__(self, image_id: int, action: str) -> None:
        self.image_id = image_id
        self.action = action
        super().__init__(image_button(image_id, action))

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
    ) -> ImageButton:
        return cls(int(match["id"]), match["action"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        async with failures_answered(interaction, f"the {self.action} button"):
            await image_action(interaction, self.image_id, self.action)


async def image_action(
    interaction: discord.Interaction[ImagineBot], image_id: int, action: str
) -> None:
    services = interaction.client.services
    if action in ("subtle", "strong", "up", *ZOOMS, *PANS):

        async def order() -> Order:
            image, generation = await load_image(services.database, image_id)
            if action == "up":
                kind, recipe = GenerationKind.UPSCALE, upscale_recipe(generation.recipe, image)
            elif action in ZOOMS or action in PANS:
                family = family_of(generation.recipe)
                margins = (
                    zoom_margins(image.width, image.height, ZOOMS[action], family)
                    if action in ZOOMS
                    else pan_margins(image.width, image.height, PANS[action], family)
                )
                kind = GenerationKind.OUTPAINT
                recipe = outpaint_recipe(generation.recipe, image, margins)
            else:
                kind = GenerationKind.VARIATION
                recipe = variation_recipe(generation.recipe, image, strong=action == "strong")
            return Order(kind, [recipe], image.id, generation.private)

        await submit_order(interaction, order, ephemeral=from_private_reply(interaction))
        return
    image, generation = await load_image(services.database, image_id)
    if action == "remix":
        recipe = remix_base(generation.recipe).model_copy(update={"seed": image.seed})
        text = format_recipe(recipe.model_copy(update={"count": 4}))
        await interaction.response.send_modal(RemixModal(generation.id, text))
    elif action == "like":
        async with services.database.session() as session:
            _liked, count = await toggle_like(session, interaction.user.id, image.id)
        await interaction.response.edit_message(view=image_view(image, count))
    elif action == "info":
        link = await image_link(services, image.id)
        text, recipe_file = describe(generation, image, f"\nOn the web: <{link}>" if link else "")
        maps = [
            discord.File(
                io.BytesIO(await services.blobs.get(ref.map_key)),
                filename=f"control-{number}-{ref.type}.png",
            )
            for number, ref in enumerate(generation.recipe.controls, start=1)
            if ref.map_key
        ]
        await interaction.response.send_message(text, ephemeral=True, files=recipe_file + maps)
    elif action == "delete":
        await _delete(interaction, generation, image)


async def _delete(
    interaction: discord.Interaction[ImagineBot], generation: Generation, image: Image
) -> None:
    if interaction.user.id != generation.requester_id and not can_manage_messages(interaction):
        raise Refusal(
            "Only the person who made this image, or a member who can manage messages, "
            "can delete it."
        )
    # A moderator elsewhere (a /show of it in their server) deletes only the message: the
    # image stays in the gallery of the server it was made in.
    if interaction.user.id == generation.requester_id or moderates(interaction, generation):
        async with interaction.client.services.database.session() as session:
            await remove_from_gallery(session, image.id, interaction.user.id)
    await interaction.response.defer()
    await interaction.delete_original_response()


# -- the cog ----------------------------------------------------------------------------------


class ImagineCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.services = bot.services

    # -- /imagine ----------------------------------------------------------------------------

    @app_commands.command(name="imagine", description="Make four images from a prompt.")
    @app_commands.describe(
        prompt="What to draw. Flags work too: --ar 3:2 --seed 7 --no people --style name",
        style="A style (LoRA) from this server's list",
        aspect_ratio="The picture's shape",
        negative="What to keep out of the picture",
        seed="The noise to start from: the same seed and prompt give the same images",
        image="An image to start from (PNG, JPEG, WebP or GIF); --iw 0-2 sets how strongly",
        control="An image whose structure to keep, with --control canny, depth, pose, ...",
    )
    @app_commands.choices(aspect_ratio=ASPECT_RATIOS)
    @app_commands.autocomplete(style=style_choices)
    async def imagine(
        self,
        interaction: discord.Interaction[ImagineBot],
        prompt: app_commands.Range[str, 1, 1500],
        style: str | None = None,
        aspect_ratio: str | None = None,
        negative: app_commands.Range[str, 1, 1000] | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        image: discord.Attachment | None = None,
        control: discord.Attachment | None = None,
    ) -> None:
        options = PromptOverrides(
            aspect_ratio=aspect_ratio,
            seed=seed,
            negative=negative,
            styles=(style,) if style else (),
        )
        await run_prompt(interaction, prompt, options, image, control)

    # -- /info /show /queue /cancel ------------------------------------------------------------

    @app_commands.command(
        name="info", description="A generation's recipe: prompt, seed and settings."
    )
    @app_commands.describe(generation="The generation's number (#N under its images)")
    async def info(self, interaction: discord.Interaction[ImagineBot], generation: int) -> None:
        try:
            found = await load_visible(self.services.database, interaction, generation)
        except ImagineError as exc:
            await refuse(interaction, str(exc))
            return
        text, files = describe(found)
        await interaction.response.send_message(text, ephemeral=True, files=files)

    @app_commands.command(name="show", description="Post a generation again, with working buttons.")
    @app_commands.describe(generation="The generation's number (#N under its images)")
    async def show(self, interaction: discord.Interaction[ImagineBot], generation: int) -> None:
        try:
            found = await load_visible(self.services.database, interaction, generation)
        except ImagineError as exc:
            await refuse(interaction, str(exc))
            return
        if found.status is not S.SUCCEEDED:
            await refuse(
                interaction,
                f"Generation {generation} is {found.status.value}; only finished ones can be "
                "shown.",
            )
            return
        if found.nsfw and interaction.guild_id is not None:
            guild = await self.bot.policies.get(interaction.guild_id)
            if (why := nsfw_refusal(interaction, guild)) is not None:
                await refuse(interaction, f"Generation {generation} has an NSFW prompt. {why}.")
                return
        await interaction.response.defer(thinking=True, ephemeral=found.private)
        rendered = await self.bot.delivery.render(found, interaction.filesize_limit)
        await send_rendered(interaction, rendered)

    @app_commands.command(name="queue", description="Your generations waiting or running.")
    async def queue(self, interaction: discord.Interaction[ImagineBot]) -> None:
        async with self.services.database.session() as session:
            active = await recent_generations(
                session, interaction.user.id, limit=25, statuses=[S.QUEUED, S.RUNNING]
            )
        if not active:
            await interaction.response.send_message(
                "You have nothing waiting or running.", ephemeral=True
            )
            return
        lines = []
        for generation in reversed(active):
            where = await self.services.queue.position(generation.id)
            prompt = generation.recipe.prompt[:80]
            if where.status is S.QUEUED:
                state = f"queued #{where.position}, about {round(where.estimated_wait_seconds)} s"
            else:
                state = where.status.value
            lines.append(f"#{generation.id} **{prompt}** — {state}")
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True)

    @app_commands.command(
        name="cancel", description="Cancel a generation (your newest if none is named)."
    )
    @app_commands.describe(generation="The generation's number (#N); leave empty for your newest")
    async def cancel(
        self, interaction: discord.Interaction[ImagineBot], generation: int | None = None
    ) -> None:
        try:
            if generation is None:
                async with self.services.database.session() as session:
                    active = await recent_generations(
                        session, interaction.user.id, limit=1, statuses=[S.QUEUED, S.RUNNING]
                    )
                if not active:
                    raise Refusal("You have nothing waiting or running to cancel.")
                found = active[0]
            else:
                found = await load_generation(self.services.database, generation)
            if found.requester_id != interaction.user.id and not moderates(interaction, found):
                raise Refusal(
                    f"Generation {found.id} is someone else's; only they or a member who can "
                    "manage messages in its server can cancel it."
                )
            result = await self.services.queue.cancel(found.id)
        except ImagineError as exc:
            await refuse(interaction, str(exc))
            return
        if result.status is S.CANCELLED:
            text = f"Generation {result.id} is cancelled."
        elif result.status is S.RUNNING:
            text = f"Generation {result.id} is stopping; it stops within a step."
        else:
            text = f"Generation {result.id} is already {result.status.value}; nothing to cancel."
        await interaction.response.send_message(text, ephemeral=True)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(ImagineCog(bot))
    bot.add_dynamic_items(GridButton, ImageButton)
