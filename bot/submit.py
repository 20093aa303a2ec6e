"""From text or recipes to queued generations: defaults, the server's rules, the queue.

What /imagine, the buttons under its results, the remix and "try it" modals and
/style add's preview have in common. Text is parsed before the first await, so a
bad flag gets an ephemeral sentence as the first response; then the interaction
is deferred and the database work follows.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import discord

from bot.image_intake import allowed_origin, receive_image
from bot.prompt import (
    PromptDefaults,
    PromptOverrides,
    parse_prompt,
    take_image_url,
    unknown_default_style,
)
from bot.rate_limit import BUSY, too_fast
from bot.replies import Refusal, answer_failure, refuse
from bot.services import Services
from storage.community import NSFW_WORDS
from storage.controls import ControlError
from storage.database import is_outage
from storage.errors import ImagineError, QueueUnavailable
from storage.generations import Origin, image_is_private
from storage.intake import IntakeLimits
from storage.models import Generation, GenerationKind, Guild, NsfwPolicy, utcnow
from storage.queue import Submission
from storage.recipe import ImageRef, Recipe

if TYPE_CHECKING:
    from bot.app import ImagineBot


def parse_text(
    services: Services,
    text: str,
    guild_id: int | None,
    options: PromptOverrides | None = None,
    fallbacks: PromptOverrides | None = None,
    *,
    image: ImageRef | None = None,
    image_expected: bool = False,
    control_source: str | None = None,
    control_expected: bool = False,
) -> list[Recipe]:
    """Prompt-language text as recipes, with the styles this server may name. ``options``
    are a command's typed values (they win over the same flag in the text); ``fallbacks``
    a member's defaults (used where neither gives a value); ``image`` the image prompt,
    or ``image_expected`` while it is still to be fetched; ``control_source`` the blob key
    of the ``control`` image (or ``control_expected``). A control this deployment has no
    model for is refused with a sentence naming what it has."""
    defaults = PromptDefaults(
        model=services.settings.model,
        family=services.family,
        style_weights=services.default_weights(guild_id),
    )
    recipes = parse_prompt(
        text,
        defaults,
        known_styles=services.known_styles(guild_id),
        overrides=options,
        fallbacks=fallbacks,
        image=image,
        image_expected=image_expected,
        control_source=control_source,
        control_expected=control_expected,
    )
    for kind in dict.fromkeys(ref.type for recipe in recipes for ref in recipe.controls):
        services.controls.find(kind, services.family.name)
    if any(recipe.controls and recipe.strength is not None for recipe in recipes):
        refusal = services.family.control_refusal("img2img")
        if refusal is not None:
            raise ControlError(refusal)
    return recipes


def take_image_link(services: Services, text: str) -> tuple[str | None, str]:
    """The Discord image link a prompt starts with, if any, and the rest of the text;
    a link to anywhere else is refused with a sentence."""
    origins = services.settings.allowed_image_origins
    return take_image_url(text, lambda url: allowed_origin(url, origins), ", ".join(origins))


def banned_word_in(text: str, banned: Sequence[str]) -> bool:
    """Whether ``text`` holds one of the words or phrases, in any case, as a whole word or
    with a plural's s or es: a word ends where letters and digits do, so ``topless_woman``
    and ``nudes`` hold a banned ``topless`` and ``nude``."""
    lowered = text.lower()
    for word in banned:
        word = word.strip().lower()
        if word and re.search(rf"(?<![^\W_]){re.escape(word)}(?:e?s)?(?![^\W_])", lowered):
            return True
    return False


def nsfw_refusal(interaction: discord.Interaction[ImagineBot], guild: Guild) -> str | None:
    """Why an NSFW prompt's images may not be made or shown in this channel, if they may
    not: the server's NSFW policy, and whether the channel is age-restricted."""
    if guild.nsfw_policy is NsfwPolicy.BLOCK:
        return "This server does not allow NSFW prompts"
    channel_nsfw = bool(getattr(interaction.channel, "is_nsfw", lambda: False)())
    if guild.nsfw_policy is NsfwPolicy.AGE_RESTRICTED_CHANNELS and not channel_nsfw:
        return "NSFW prompts are allowed only in age-restricted channels here"
    return None


async def nsfw_shown_here(interaction: discord.Interaction[ImagineBot]) -> bool:
    """Whether images of NSFW prompts may be posted where ``interaction`` came from (in a
    server; a direct message has no server policy)."""
    if interaction.guild_id is None:
        return True
    guild = await interaction.client.policies.get(interaction.guild_id)
    return nsfw_refusal(interaction, guild) is None


async def check_policy(
    interaction: discord.Interaction[ImagineBot], recipes: Sequence[Recipe]
) -> None:
    """The server's rules: banned words, where NSFW prompts may go, who may use a style."""
    if interaction.guild_id is None:
        return
    guild = await interaction.client.policies.get(interaction.guild_id)
    roles = {role.id for role in getattr(interaction.user, "roles", [])}
    for recipe in recipes:
        if banned_word_in(recipe.prompt, guild.banned_words or []):
            raise Refusal(
                "This server does not allow a word in that prompt; "
                "rephrase it (the server's moderators keep the list)."
            )
        if banned_word_in(recipe.prompt, NSFW_WORDS):
            why = nsfw_refusal(interaction, guild)
            if why is not None:
                blocked = guild.nsfw_policy is NsfwPolicy.BLOCK
                raise Refusal(f"{why}; {'' if blocked else 'use one of those, or '}rephrase it.")
        for style in recipe.styles:
            allowed = (guild.style_roles or {}).get(style.name)
            if allowed and not roles & set(allowed):
                raise Refusal(
                    f"The style {style.name} is for members with "
                    + " or ".join(f"<@&{role}>" for role in allowed)
                    + "; ask a moderator, or pick another style."
                )


async def within_rate_limit(interaction: discord.Interaction[ImagineBot]) -> bool:
    """Whether the member may send this command now (``IMAGINE_RATE_LIMIT``, and room in
    the line of commands waiting their turn); if not, they are told when they may try
    again. Memory only, so it costs no round trip before the first response."""
    if interaction.client.submitting.full:
        await refuse(interaction, BUSY)
        return False
    limiter = interaction.client.rate_limiter
    if limiter is None:
        return True
    wait = limiter.try_acquire(interaction.user.id)
    if wait <= 0:
        return True
    await refuse(interaction, too_fast(wait))
    return False


async def defer_within_rate_limit(interaction: discord.Interaction[ImagineBot]) -> bool:
    """A button's first response before any database work, so that it is in time however
    busy the database is: refused if over the rate limit, else deferred (privately under
    a private result: :func:`from_private_reply`)."""
    if not await within_rate_limit(interaction):
        return False
    await interaction.response.defer(thinking=True, ephemeral=from_private_reply(interaction))
    return True


def from_private_reply(interaction: discord.Interaction[ImagineBot]) -> bool:
    """Whether ``interaction`` is a button of a message only its member sees (a private
    result, ``/settings private``): what it makes is answered only to them too. Read from
    the message, so it is known before any database work."""
    message = interaction.message
    return message is not None and message.flags.ephemeral


@dataclass(frozen=True)
class Order:
    """What a command asks to queue: one generation per recipe."""

    kind: GenerationKind
    recipes: Sequence[Recipe]
    parent_image_id: int | None = None
    private: bool = False  # kept off the web: an ephemeral reply, or made from a private image


async def submit(
    interaction: discord.Interaction[ImagineBot],
    kind: GenerationKind,
    recipes: Sequence[Recipe],
    *,
    parent_image_id: int | None = None,
    private: bool = False,
    rate_limited: bool = True,
) -> list[Generation]:
    """Defer, check policy, submit one generation per recipe, show each one's place in line.

    The first generation takes the deferred response's message; the others get
    a followup message each. ``rate_limited``: the member's command counts against
    their rate limit, and nothing is queued when it is over. ``private``: the reply is
    ephemeral, and the generations stay off the web.
    """

    async def order() -> Order:
        # What is made from a private result stays off the web too.
        made_private = private or await _made_from_private(interaction.client, parent_image_id)
        return Order(kind, recipes, parent_image_id, made_private)

    return await submit_order(interaction, order, ephemeral=private, rate_limited=rate_limited)


async def submit_order(
    interaction: discord.Interaction[ImagineBot],
    read: Callable[[], Awaitable[Order]],
    *,
    ephemeral: bool = False,
    rate_limited: bool = True,
) -> list[Generation]:
    """:func:`submit` for what a button makes from a record: ``read`` reads the record
    and says what to queue, in the same turn (:attr:`ImagineBot.submitting`) as the
    submission of the first generation, so that a click waits its turn once.

    Only the database work takes a turn; Discord's answers come before and after it.
    """
    received = utcnow()
    if rate_limited and not await within_rate_limit(interaction):
        return []
    message_id: int | None = None
    if not interaction.response.is_done():
        callback = await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        message_id = callback.message_id if callback is not None else None
    if message_id is None:
        message_id = (await interaction.original_response()).id
    bot = interaction.client
    submitted: list[Generation] = []
    number = 0
    order: Order | None = None
    while order is None or number < len(order.recipes):
        if number > 0:
            message_id = (await interaction.followup.send("⏳", wait=True, ephemeral=ephemeral)).id
        async with contextlib.AsyncExitStack() as showing:
            try:
                # A burst of members waits here, in turn, rather than for more database
                # connections than the pool has (which fails after its timeout). Only the
                # database work takes a turn; Discord's answers come before and after it.
                async with bot.submitting:
                    if order is None:
                        order = await read()
                        await check_policy(interaction, order.recipes)
                    generation = await bot.services.queue.submit(
                        _submission(interaction, order, number, message_id, received)
                    )
                    queued = await showing.enter_async_context(
                        bot.delivery.place_in_line(generation, interaction.filesize_limit)
                    )
            except Exception as exc:
                if not isinstance(exc, ImagineError) and not is_outage(exc):
                    raise
                # A refusal, a limit, or a database that cannot answer now: a sentence.
                sentence = str(exc) if isinstance(exc, ImagineError) else str(QueueUnavailable())
                if number == 0:
                    await refuse(interaction, sentence)
                else:  # its "⏳" would wait for nothing
                    with contextlib.suppress(discord.HTTPException):
                        await interaction.followup.delete_message(message_id)
                    await interaction.followup.send(sentence, ephemeral=True)
                break
            submitted.append(generation)
            if queued is not None:
                await bot.delivery.show_queued(generation, queued)
        number += 1
    return submitted


async def _made_from_private(bot: ImagineBot, parent_image_id: int | None) -> bool:
    if parent_image_id is None:
        return False
    async with bot.services.database.autocommit_session() as session:
        return await image_is_private(session, parent_image_id)


def _submission(
    interaction: discord.Interaction[ImagineBot],
    order: Order,
    number: int,
    message_id: int,
    received: datetime,
) -> Submission:
    recipe = order.recipes[number]
    origin = Origin(
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        message_id=message_id,
        interaction_token=interaction.token,
        interaction_at=received,
    )
    return Submission(
        order.kind,
        recipe,
        interaction.user.id,
        origin,
        parent_image_id=order.parent_image_id,
        private=order.private,
        nsfw=banned_word_in(recipe.prompt, NSFW_WORDS),
    )


async def run_prompt(
    interaction: discord.Interaction[ImagineBot],
    text: str,
    options: PromptOverrides | None = None,
    image: discord.Attachment | None = None,
    control: discord.Attachment | None = None,
) -> None:
    """What /imagine does with its text, typed options and images: the member's defaults,
    parse, fetch and keep the image prompt and the control image, then submit."""
    bot = interaction.client
    services = bot.services
    defaults = bot.user_defaults.get(interaction.user.id, {})
    fallbacks = PromptOverrides.from_user_defaults(defaults)
    private = bool(defaults.get("private", False))
    try:
        url, text = take_image_link(services, text)
        if url is not None and image is not None:
            raise Refusal(
                "Give one image prompt: attach an image or start the prompt with its link, "
                "not both."
            )
        limits = IntakeLimits.from_settings(services.settings)
        if image is not None:
            limits.check_size(image.size, "The image")
        if control is not None:
            limits.check_size(control.size, "The control image")
        expected = url is not None or image is not None
        recipes = parse_text(
            services,
            text,
            interaction.guild_id,
            options,
            fallbacks,
            image_expected=expected,
            control_expected=control is not None,
        )
    except ImagineError as exc:
        await refuse(interaction, str(exc))
        return
    if not expected and control is None:
        made = await submit(interaction, GenerationKind.IMAGINE, recipes, private=private)
        await _say_default_style_left_out(interaction, fallbacks, recipes, made)
        return
    if not await within_rate_limit(interaction):
        return
    await interaction.response.defer(thinking=True, ephemeral=private)
    try:
        stored = await receive_image(services, attachment=image, url=url) if expected else None
        structure = None
        if control is not None:
            structure = (await receive_image(services, attachment=control)).blob_key
        recipes = parse_text(
            services,
            text,
            interaction.guild_id,
            options,
            fallbacks,
            image=stored,
            control_source=structure,
        )
    except Exception as exc:
        await answer_failure(interaction, exc, "/imagine")
        return
    made = await submit(
        interaction, GenerationKind.IMAGINE, recipes, private=private, rate_limited=False
    )
    await _say_default_style_left_out(interaction, fallbacks, recipes, made)


async def _say_default_style_left_out(
    interaction: discord.Interaction[ImagineBot],
    fallbacks: PromptOverrides,
    recipes: Sequence[Recipe],
    made: Sequence[Generation],
) -> None:
    """Tell the member, once their prompt is queued, that their default style was left out
    because it is not a style here (where their prompt named no style of its own)."""
    known = interaction.client.services.known_styles(interaction.guild_id)
    name = unknown_default_style(fallbacks, known)
    if name is None or not made or all(recipe.styles for recipe in recipes):
        return
    await interaction.followup.send(
        f"Your /settings default style {name} is not a style here, so this ran without it; "
        "pick another with /settings set, or forget it with /settings reset default:style.",
        ephemeral=True,
    )
