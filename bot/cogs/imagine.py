"""``/imagine`` and what follows it: the grid and image buttons, remix, and the queue commands.

Every handler answers within Discord's 3 s: text is parsed before the first
await (so a bad flag gets an ephemeral sentence as the first response), then
the interaction is deferred and the database work follows. Every user error is
an ephemeral sentence saying what to change.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.delivery import Rendered
from bot.prompt import (
    PromptDefaults,
    PromptError,
    PromptOverrides,
    format_recipe,
    parse_prompt,
)
from bot.views import RemixModal
from storage.community import NSFW_WORDS, guild_policy
from storage.derive import remix_base, reroll_recipe, upscale_recipe, variation_recipe
from storage.errors import ImagineError, NotFound
from storage.gallery import remove_from_gallery, toggle_like
from storage.generations import Origin, get_generation, get_image, recent_generations
from storage.models import Generation, GenerationKind, GenerationStatus, Image, NsfwPolicy, utcnow
from storage.queue import Submission
from storage.recipe import MAX_SEED, Recipe

if TYPE_CHECKING:
    from bot.app import ImagineBot

S = GenerationStatus
log = logging.getLogger(__name__)

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
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """Autocomplete for any style option: the server's styles matching what was typed."""
    services = interaction.client.services  # type: ignore[attr-defined]
    names = services.search_styles(interaction.guild_id, current, limit=25)
    return [app_commands.Choice(name=name, value=name) for name in names[:25]]


class Refusal(ImagineError):
    """A sentence for the user, sent ephemerally."""


def banned_word_in(text: str, banned: Sequence[str]) -> bool:
    lowered = text.lower()
    for word in banned:
        word = word.strip().lower()
        if word and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", lowered):
            return True
    return False


def can_manage_messages(interaction: discord.Interaction) -> bool:
    return bool(interaction.permissions.manage_messages)


class ImagineCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.services = bot.services
        self.delivery = bot.delivery

    # -- answering ---------------------------------------------------------------------------

    async def refuse(self, interaction: discord.Interaction, message: str) -> None:
        """An ephemeral sentence, whether or not the interaction was answered already."""
        if not interaction.response.is_done():
            await interaction.response.send_message(message, ephemeral=True)
            return
        if interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()  # the public "thinking…"

        await interaction.followup.send(message, ephemeral=True)

    def defaults(self) -> PromptDefaults:
        return PromptDefaults(
            model=self.services.settings.model,
            family=self.services.family,
            style_weights=self.services.style_weights,
        )

    def parse(
        self,
        text: str,
        guild_id: int | None,
        options: PromptOverrides | None = None,
        user_defaults: PromptOverrides | None = None,
    ) -> list[Recipe]:
        known = self.services.known_styles(guild_id)
        return parse_prompt(
            text, self.defaults(), known_styles=known, overrides=options, fallbacks=user_defaults
        )

    async def check_policy(
        self, interaction: discord.Interaction, recipes: Sequence[Recipe]
    ) -> None:
        """The server's rules: banned words, where NSFW prompts may go, who may use a style."""
        if interaction.guild_id is None:
            return
        async with self.services.database.session() as session:
            guild = await guild_policy(session, interaction.guild_id)
        channel_nsfw = bool(getattr(interaction.channel, "is_nsfw", lambda: False)())
        roles = {role.id for role in getattr(interaction.user, "roles", [])}
        for recipe in recipes:
            if banned_word_in(recipe.prompt, guild.banned_words or []):
                raise Refusal(
                    "This server does not allow a word in that prompt; "
                    "rephrase it (the server's moderators keep the list)."
                )
            if banned_word_in(recipe.prompt, NSFW_WORDS):
                if guild.nsfw_policy is NsfwPolicy.BLOCK:
                    raise Refusal("This server does not allow NSFW prompts; rephrase it.")
                if guild.nsfw_policy is NsfwPolicy.AGE_RESTRICTED_CHANNELS and not channel_nsfw:
                    raise Refusal(
                        "NSFW prompts are allowed only in age-restricted channels here; "
                        "use one of those, or rephrase it."
                    )
            for style in recipe.styles:
                allowed = (guild.style_roles or {}).get(style.name)
                if allowed and not roles & set(allowed):
                    raise Refusal(
                        f"The style {style.name} is for members with "
                        + " or ".join(f"<@&{role}>" for role in allowed)
                        + "; ask a moderator, or pick another style."
                    )

    async def submit(
        self,
        interaction: discord.Interaction,
        kind: GenerationKind,
        recipes: Sequence[Recipe],
        *,
        parent_image_id: int | None = None,
        private: bool = False,
    ) -> list[Generation]:
        """Defer, check policy, submit one generation per recipe, show each one's place in line.

        The first generation takes the deferred response's message; the others get
        a followup message each.
        """
        received = utcnow()
        first_message_id: int | None = None
        if not interaction.response.is_done():
            callback = await interaction.response.defer(thinking=True, ephemeral=private)
            first_message_id = callback.message_id if callback is not None else None
        try:
            await self.check_policy(interaction, recipes)
        except Refusal as exc:
            await self.refuse(interaction, str(exc))
            return []
        if first_message_id is None:
            first_message_id = (await interaction.original_response()).id
        submitted: list[Generation] = []
        limit = interaction.filesize_limit
        for number, recipe in enumerate(recipes):
            if number == 0:
                message_id = first_message_id
            else:
                message_id = (await interaction.followup.send("⏳", wait=True)).id
            origin = Origin(
                guild_id=interaction.guild_id,
                channel_id=interaction.channel_id,
                message_id=message_id,
                interaction_token=interaction.token,
                interaction_at=received,
            )
            submission = Submission(
                kind, recipe, interaction.user.id, origin, parent_image_id=parent_image_id
            )
            try:
                generation = await self.services.queue.submit(submission)
            except ImagineError as exc:
                if number == 0:
                    await self.refuse(interaction, str(exc))
                else:
                    await interaction.followup.send(str(exc), ephemeral=True)
                break
            submitted.append(generation)
            await self.delivery.show_queued(generation.id, limit)
        return submitted

    # -- /imagine ----------------------------------------------------------------------------

    @app_commands.command(name="imagine", description="Make four images from a prompt.")
    @app_commands.describe(
        prompt="What to draw. Flags work too: --ar 3:2 --seed 7 --no people --style name",
        style="A style (LoRA) from this server's list",
        aspect_ratio="The picture's shape",
        negative="What to keep out of the picture",
        seed="The noise to start from: the same seed and prompt give the same images",
    )
    @app_commands.choices(aspect_ratio=ASPECT_RATIOS)
    @app_commands.autocomplete(style=style_choices)
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 1500],
        style: str | None = None,
        aspect_ratio: str | None = None,
        negative: app_commands.Range[str, 1, 1000] | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
    ) -> None:
        options = PromptOverrides(
            aspect_ratio=aspect_ratio,
            seed=seed,
            negative=negative,
            styles=(style,) if style else (),
        )
        await self.run_prompt(interaction, prompt, options)

    async def run_prompt(
        self, interaction: discord.Interaction, text: str, options: PromptOverrides | None = None
    ) -> None:
        """What /imagine does with its text and options: the user's defaults, parse, submit."""
        defaults = self.bot.user_defaults.get(interaction.user.id, {})
        try:
            recipes = self.parse(
                text, interaction.guild_id, options, PromptOverrides.from_user_defaults(defaults)
            )
        except PromptError as exc:
            await self.refuse(interaction, str(exc))
            return
        await self.submit(
            interaction,
            GenerationKind.IMAGINE,
            recipes,
            private=bool(defaults.get("private", False)),
        )

    # -- grid buttons ------------------------------------------------------------------------

    async def _generation(self, generation_id: int) -> Generation:
        async with self.services.database.session() as session:
            return await get_generation(session, generation_id)

    async def grid_action(
        self, interaction: discord.Interaction, generation_id: int, action: str
    ) -> None:
        try:
            generation = await self._generation(generation_id)
            if action == "remix":
                text = format_recipe(remix_base(generation.recipe))
                await interaction.response.send_modal(RemixModal(generation_id, text))
                return
            if action == "reroll":
                recipe = reroll_recipe(generation.recipe)
                await self.submit(interaction, GenerationKind.REROLL, [recipe])
                return
            image = self._tile(generation, int(action[1:]))
            if action[0] == "u":
                await self.post_image(interaction, generation, image)
            else:
                recipe = variation_recipe(generation.recipe, image, strong=True)
                await self.submit(
                    interaction, GenerationKind.VARIATION, [recipe], parent_image_id=image.id
                )
        except ImagineError as exc:
            await self.refuse(interaction, str(exc))

    def _tile(self, generation: Generation, number: int) -> Image:
        images = sorted(generation.images, key=lambda image: image.index)
        if not 1 <= number <= len(images):
            raise Refusal(f"Generation {generation.id} has {len(images)} images, not {number}.")
        return images[number - 1]

    async def post_image(
        self, interaction: discord.Interaction, generation: Generation, image: Image
    ) -> None:
        await interaction.response.defer(thinking=True)
        limit = interaction.filesize_limit
        rendered = await self.delivery.render_image(generation, image, limit)
        await self._send(interaction, rendered)

    async def _send(self, interaction: discord.Interaction, rendered: Rendered) -> None:
        kwargs: dict[str, object] = {"content": rendered.content, "files": rendered.files()}
        if rendered.view is not None:
            kwargs["view"] = rendered.view
        await interaction.followup.send(**kwargs)  # type: ignore[call-overload]

    async def remix_submitted(
        self, interaction: discord.Interaction, generation_id: int, text: str
    ) -> None:
        try:
            await self._generation(generation_id)  # it must still exist
            recipes = self.parse(text, interaction.guild_id)
        except ImagineError as exc:
            await self.refuse(interaction, str(exc))
            return
        await self.submit(interaction, GenerationKind.REMIX, recipes)

    # -- single-image buttons ----------------------------------------------------------------

    async def image_action(
        self, interaction: discord.Interaction, image_id: int, action: str
    ) -> None:
        try:
            async with self.services.database.session() as session:
                image = await get_image(session, image_id)
                generation = await get_generation(session, image.generation_id)
            if action in ("subtle", "strong"):
                recipe = variation_recipe(generation.recipe, image, strong=action == "strong")
                await self.submit(
                    interaction, GenerationKind.VARIATION, [recipe], parent_image_id=image.id
                )
            elif action == "up":
                recipe = upscale_recipe(generation.recipe, image)
                await self.submit(
                    interaction, GenerationKind.UPSCALE, [recipe], parent_image_id=image.id
                )
            elif action == "remix":
                recipe = remix_base(generation.recipe).model_copy(update={"seed": image.seed})
                text = format_recipe(recipe.model_copy(update={"count": 4}))
                await interaction.response.send_modal(RemixModal(generation.id, text))
            elif action == "like":
                await self._like(interaction, image)
            elif action == "info":
                await interaction.response.send_message(
                    self.describe(generation, image), ephemeral=True
                )
            elif action == "delete":
                await self._delete(interaction, generation, image)
        except ImagineError as exc:
            await self.refuse(interaction, str(exc))

    async def _like(self, interaction: discord.Interaction, image: Image) -> None:
        async with self.services.database.session() as session:
            _liked, count = await toggle_like(session, interaction.user.id, image.id)
        from bot.views import image_view

        await interaction.response.edit_message(view=image_view(image, count))

    async def _delete(
        self, interaction: discord.Interaction, generation: Generation, image: Image
    ) -> None:
        if interaction.user.id != generation.requester_id and not can_manage_messages(interaction):
            raise Refusal(
                "Only the person who made this image, or a member who can manage messages, "
                "can delete it."
            )
        async with self.services.database.session() as session:
            await remove_from_gallery(session, image.id, interaction.user.id)
        await interaction.response.defer()
        await interaction.delete_original_response()

    def describe(self, generation: Generation, image: Image | None = None) -> str:
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
            f"Model: `{recipe.model}`"
            + (f" ({recipe.model_family})" if recipe.model_family else "")
        )
        if recipe.strength is not None:
            lines.append(f"Strength {recipe.strength} from image {recipe.source_image_id}")
        lines.append("Prompt to reproduce it:")
        lines.append(f"```\n{format_recipe(recipe)[:1500]}\n```")
        return "\n".join(lines)[:2000]

    # -- /info /show /queue /cancel ------------------------------------------------------------

    @app_commands.command(
        name="info", description="A generation's recipe: prompt, seed and settings."
    )
    @app_commands.describe(generation="The generation's number (#N under its images)")
    async def info(self, interaction: discord.Interaction, generation: int) -> None:
        try:
            found = await self._generation(generation)
        except NotFound as exc:
            await self.refuse(interaction, str(exc))
            return
        await interaction.response.send_message(self.describe(found), ephemeral=True)

    @app_commands.command(name="show", description="Post a generation again, with working buttons.")
    @app_commands.describe(generation="The generation's number (#N under its images)")
    async def show(self, interaction: discord.Interaction, generation: int) -> None:
        try:
            found = await self._generation(generation)
        except NotFound as exc:
            await self.refuse(interaction, str(exc))
            return
        if found.status is not S.SUCCEEDED:
            await self.refuse(
                interaction,
                f"Generation {generation} is {found.status.value}; only finished ones can be "
                "shown.",
            )
            return
        await interaction.response.defer(thinking=True)
        limit = interaction.filesize_limit
        await self._send(interaction, await self.delivery.render(found, limit))

    @app_commands.command(name="queue", description="Your generations waiting or running.")
    async def queue(self, interaction: discord.Interaction) -> None:
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
    async def cancel(self, interaction: discord.Interaction, generation: int | None = None) -> None:
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
                found = await self._generation(generation)
            if found.requester_id != interaction.user.id and not can_manage_messages(interaction):
                raise Refusal(
                    f"Generation {found.id} is someone else's; only they or a member who can "
                    "manage messages can cancel it."
                )
            result = await self.services.queue.cancel(found.id)
        except ImagineError as exc:
            await self.refuse(interaction, str(exc))
            return
        if result.status is S.CANCELLED:
            text = f"Generation {result.id} is cancelled."
        elif result.status is S.RUNNING:
            text = f"Generation {result.id} is stopping; it stops within a step."
        else:
            text = f"Generation {result.id} is already {result.status.value}; nothing to cancel."
        await interaction.response.send_message(text, ephemeral=True)
