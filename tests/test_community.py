"""Personal defaults and server policy, end to end through the fake Discord."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import discord
from sqlalchemy import select

from bot.cogs.community import MAX_BANNED
from generation.engine import Engine
from generation.tiny import build_tiny_lora
from storage.models import Guild, PolicyChange
from tests.fake_discord import (
    ALICE,
    ARTISTS_ROLE,
    BOB,
    CHANNEL_ID,
    EPHEMERAL,
    GUILD_ID,
    MANAGE_GUILD,
    MOD,
)
from tests.test_bot import Harness, harness, running
from tests.test_bot_edges import said
from tests.test_styles_discord import add_style

__all__ = ["harness", "running"]


async def answer(running: Harness, interaction: Any) -> dict[str, Any]:
    await running.fake.wait_for(lambda: interaction.responses, what="an answer")
    data: dict[str, Any] = interaction.responses[0].get("data") or {}
    return data


async def test_a_default_aspect_ratio_applies_to_the_next_imagine(running: Harness) -> None:
    fake = running.fake
    data = await answer(
        running,
        await fake.slash("settings", subcommand="set", options={"aspect_ratio": "3:2", "steps": 2}),
    )
    assert data["flags"] & EPHEMERAL and "aspect ratio: `3:2`" in data["content"]

    await running.result(await running.imagine("a boat"))
    await running.result(await running.imagine("a boat --ar 1:1"))  # the prompt wins
    await running.result(await running.imagine("a boat", by=BOB))  # not Bob's default
    mine, square, bobs = await running.generations()
    assert (mine.recipe.aspect_ratio, mine.recipe.steps) == ("3:2", 2)
    assert mine.recipe.width > mine.recipe.height
    assert square.recipe.aspect_ratio == "1:1"
    assert bobs.recipe.aspect_ratio is None

    shown = await answer(running, await fake.slash("settings", subcommand="show"))
    assert "steps: `2`" in shown["content"]
    await answer(running, await fake.slash("settings", subcommand="reset"))
    await running.stop_bot()  # defaults survive a restart, and so does the reset
    await running.start_bot()
    shown = await answer(running, await fake.slash("settings", subcommand="show"))
    assert "no defaults" in shown["content"]


async def test_a_default_style_gone_from_here_is_left_out_and_can_be_forgotten_alone(
    running: Harness, tiny_engine: Engine, tmp_path: Path
) -> None:
    """A default style is a member's, a style a server's: once it is not a style here,
    /imagine runs without it and says so, and /settings reset forgets only it."""
    fake = running.fake
    lora = build_tiny_lora(tiny_engine.pipe.unet, tmp_path / "neon.safetensors", seed=21)
    await running.result(await add_style(running, "neon.safetensors", lora.read_bytes()))
    options = {"style": "neon", "private": True}
    await answer(running, await fake.slash("settings", subcommand="set", options=options))
    removed = await fake.slash(
        "style", subcommand="remove", options={"name": "neon"}, by=MOD, permissions=MANAGE_GUILD
    )
    await answer(running, removed)

    made = await running.imagine("a boat --steps 2")
    note = await said(running, made)
    assert note.startswith("Your /settings default style neon is not a style here")
    assert "/settings reset default:style" in note
    await running.result(made)
    *_, generation = await running.generations()
    assert generation.recipe.styles == () and generation.private

    forgot = await answer(
        running, await fake.slash("settings", subcommand="reset", options={"default": "style"})
    )
    assert "private replies: `True`" in forgot["content"] and "style" not in forgot["content"]
    await running.stop_bot()  # forgotten in the database too
    await running.start_bot()
    plain = await running.imagine("a boat --steps 2")
    message = await running.result(plain)
    assert message["flags"] & EPHEMERAL and fake.said_privately(plain) is None
    *_, generation = await running.generations()
    assert generation.recipe.styles == () and generation.private


async def test_policy_is_for_managers_and_every_change_is_recorded(running: Harness) -> None:
    fake = running.fake
    refused = await answer(
        running, await fake.slash("policy", subcommand="ban", options={"words": "boat"}, by=BOB)
    )
    assert refused["flags"] & EPHEMERAL and "Manage Server" in refused["content"]

    done = await answer(
        running,
        await fake.slash(
            "policy",
            subcommand="ban",
            options={"words": "Boat, storm"},
            by=MOD,
            permissions=MANAGE_GUILD,
        ),
    )
    assert "banned 2 word(s)" in done["content"]
    blocked = await running.imagine("a red boat at sea")
    await fake.wait_for(lambda: fake.calls_to("POST", "/webhooks/"), what="the refusal")
    assert fake.original(blocked) is None
    assert await running.generations() == []
    async with running.database.session() as session:
        [change] = list(await session.scalars(select(PolicyChange)))
    assert change.user_id == int(MOD["id"]) and "banned 2" in change.change


async def test_a_ban_past_the_limit_is_refused_whole(running: Harness) -> None:
    fake = running.fake

    async def ban(words: str) -> dict[str, Any]:
        return await answer(
            running,
            await fake.slash(
                "policy",
                subcommand="ban",
                options={"words": words},
                by=MOD,
                permissions=MANAGE_GUILD,
            ),
        )

    full = [f"word{number:03}" for number in range(MAX_BANNED)]
    assert f"banned {MAX_BANNED} word(s)" in (await ban(", ".join(full)))["content"]
    refused = await ban("aardvark, zebra")  # sorted, the cut kept the first 200: word199 went
    assert refused["flags"] & EPHEMERAL
    assert refused["content"] == (
        f"A server can ban at most {MAX_BANNED} words or phrases; this one bans {MAX_BANNED}, "
        f"and these would make {MAX_BANNED + 2}. Unban some first (/policy unban), or ban "
        "fewer at once."
    )
    async with running.database.session() as session:
        guild = await session.get(Guild, GUILD_ID)
        changes = list(await session.scalars(select(PolicyChange)))
    assert guild is not None and guild.banned_words == full
    assert len(changes) == 1


async def test_nsfw_prompts_follow_the_server_setting(running: Harness) -> None:
    fake = running.fake
    first = await running.imagine("a nude statue --steps 2")
    await fake.wait_for(lambda: fake.calls_to("POST", "/webhooks/"), what="the refusal")
    ephemeral = [m for m in fake.messages.values() if m["flags"] & EPHEMERAL]
    assert "age-restricted" in ephemeral[-1]["content"] and fake.original(first) is None

    await answer(
        running,
        await fake.slash(
            "policy",
            subcommand="nsfw",
            options={"where": "allow"},
            by=MOD,
            permissions=MANAGE_GUILD,
        ),
    )
    await running.result(await running.imagine("a nude statue --steps 2"))
    [generation] = await running.generations()
    assert generation.nsfw and not generation.private  # kept off the web gallery by default


async def age_restricted(running: Harness, nsfw: bool) -> None:
    await running.fake.set_channel_nsfw(nsfw)
    bot = running.bot
    assert bot is not None

    def updated() -> bool:
        channel = bot.get_channel(CHANNEL_ID)
        return isinstance(channel, discord.TextChannel) and channel.is_nsfw() is nsfw

    await running.fake.wait_for(updated, what="the channel update")


async def test_nsfw_images_are_shown_only_where_nsfw_prompts_may_go(running: Harness) -> None:
    """The server's default: NSFW prompts in age-restricted channels only. Their images
    stay there too: /gallery and /show elsewhere leave them out."""
    fake = running.fake
    await running.result(await running.imagine("a quiet harbour --steps 2"))
    refused = await running.imagine("a topless_woman on a beach --steps 2")  # _ joins words
    assert "age-restricted" in await said(running, refused)
    await age_restricted(running, True)
    await running.result(await running.imagine("two nudes on a beach --steps 2"))  # plural
    plain, nsfw = await running.generations()
    assert nsfw.nsfw and not plain.nsfw

    async def gallery_shows() -> str:
        options = {"sort": "new", "period": "all"}
        message = await running.result(await fake.slash("gallery", options=options))
        return str(message["content"])

    assert f"of #{nsfw.id}" in await gallery_shows()
    await age_restricted(running, False)
    assert f"of #{plain.id}" in await gallery_shows()
    shown = await fake.slash("show", options={"generation": nsfw.id})
    assert await said(running, shown) == (
        f"Generation {nsfw.id} has an NSFW prompt. "
        "NSFW prompts are allowed only in age-restricted channels here."
    )
    await running.result(await fake.slash("show", options={"generation": plain.id}))


async def test_a_style_reserved_for_a_role(running: Harness) -> None:
    fake = running.fake
    role, resolved = fake.role_option(ARTISTS_ROLE)
    await answer(
        running,
        await fake.slash(
            "policy",
            subcommand="style-role",
            options={"style": "style-01", "role": role},
            resolved=resolved,
            by=MOD,
            permissions=MANAGE_GUILD,
        ),
    )
    refused = await fake.slash("imagine", options={"prompt": "a cat --style style-01 --steps 2"})
    await fake.wait_for(lambda: fake.calls_to("POST", "/webhooks/"), what="the refusal")
    assert fake.original(refused) is None
    allowed = await fake.slash(
        "imagine",
        options={"prompt": "a cat --style style-01 --steps 2"},
        by=ALICE,
        roles=(ARTISTS_ROLE,),
    )
    await running.result(allowed)
    [generation] = await running.generations()
    assert generation.recipe.styles[0].name == "style-01"


async def test_private_replies_keep_results_to_their_author(running: Harness) -> None:
    fake = running.fake
    await answer(running, await fake.slash("settings", subcommand="set", options={"private": True}))
    interaction = await running.imagine("a boat --steps 2")
    message = await running.result(interaction)
    assert interaction.responses[0] == {"type": 5, "data": {"flags": EPHEMERAL}}
    assert message["flags"] & EPHEMERAL and message["attachments"]
    [generation] = await running.generations()
    assert generation.private and not generation.nsfw  # never on the web gallery


async def test_what_a_private_result_makes_stays_private(running: Harness) -> None:
    """Its buttons (reroll, U, V, Vary, Remix), a --repeat's other runs and /show answer
    only to its member, and what they make stays off the web; /info and /show refuse a
    private generation to everyone else."""
    fake = running.fake
    await answer(running, await fake.slash("settings", subcommand="set", options={"private": True}))
    grid = await running.result(await running.imagine("a boat --steps 2 --repeat 2"))
    rerolled = await running.result(await running.press(grid, "🔄"))
    await running.result(await running.press(grid, "V1"))
    single = await running.result(await running.press(grid, "U1"))
    await running.result(await running.press(single, "Vary (Subtle)"))
    click = await running.press(rerolled, "Remix")
    await fake.wait_for(lambda: click.responses, what="the modal")
    modal = click.responses[0]["data"]
    text = modal["components"][0]["components"][0]["value"]
    await running.result(await fake.submit_modal(modal["custom_id"], {"prompt": "a red " + text}))
    first = (await running.generations())[0]
    await fake.slash("settings", subcommand="set", options={"private": False})
    await running.result(await fake.slash("show", options={"generation": first.id}))

    def results() -> list[dict[str, Any]]:
        messages = fake.messages.values()
        return [m for m in messages if m["attachments"] and fake.buttons(int(m["id"]))]

    # The grid and the --repeat's second, the reroll, V1, U1, Vary, the remix and /show.
    await fake.wait_for(lambda: len(results()) == 8 or None, what="every result")
    assert all(message["flags"] & EPHEMERAL for message in results())
    made = await running.generations()
    assert len(made) == 6 and all(generation.private for generation in made)

    refusals = [
        await fake.slash(command, options={"generation": first.id}, by=BOB)
        for command in ("info", "show")
    ]
    for refused in refusals:
        said = await fake.wait_for(partial(fake.said_privately, refused), what="the refusal")
        assert said == (
            f"Generation {first.id} is private: only the member who made it can see it."
        )


async def test_a_server_waiting_limit_refuses_with_the_count(harness: Harness) -> None:
    await harness.start_bot()  # no worker: jobs wait
    fake = harness.fake
    await answer(
        harness,
        await fake.slash(
            "policy",
            subcommand="limits",
            options={"waiting": 1},
            by=MOD,
            permissions=MANAGE_GUILD,
        ),
    )
    first = await harness.imagine("a boat --steps 2")
    await fake.wait_for(lambda: "queued" in (fake.original(first) or {}).get("content", ""))
    second = await harness.imagine("a second boat --steps 2")
    said = await fake.wait_for(lambda: fake.said_privately(second), what="the refusal")
    assert "1 of your job is already waiting, the most allowed here is 1" in said
    assert len(await harness.generations()) == 1


async def test_a_style_name_too_long_for_a_message_gets_the_refusal(harness: Harness) -> None:
    await harness.start_bot()  # no worker: nothing here needs one
    fake = harness.fake
    long_name = "watercolor" * 210  # 2100 characters: quoted whole, the reply would not fit
    for asked in (
        await fake.slash("settings", subcommand="set", options={"style": long_name}),
        await fake.slash("gallery", options={"style": long_name}),
    ):
        sentence = await said(harness, asked)
        assert len(sentence) <= 2000
        assert sentence.startswith("There is no style 'watercolorwater") and "..." in sentence
    shown = await answer(harness, await fake.slash("settings", subcommand="show"))
    assert "no defaults" in shown["content"]


async def style_role(harness: Harness, style: str, **options: Any) -> Any:
    role, resolved = harness.fake.role_option(ARTISTS_ROLE)
    return await harness.fake.slash(
        "policy",
        subcommand="style-role",
        options={"style": style, "role": role, **options},
        resolved=resolved,
        by=MOD,
        permissions=MANAGE_GUILD,
    )


async def test_a_style_reserved_for_a_role_must_be_one_of_the_server(harness: Harness) -> None:
    await harness.start_bot()  # no worker: nothing here needs one
    fake = harness.fake
    offered = await fake.autocomplete("policy", "style", "style-2", by=MOD, subcommand="style-role")
    assert [choice["value"] for choice in offered][:10] == [f"style-2{n}" for n in range(10)]

    refused = await said(harness, await style_role(harness, "Style-01"))
    assert refused.startswith("There is no style 'Style-01'; did you mean style-01")
    async with harness.database.session() as session:
        assert list(await session.scalars(select(PolicyChange))) == []

    done = await answer(harness, await style_role(harness, "style-01"))
    assert "style style-01: may use role artists" in done["content"]
    async with harness.database.session() as session:  # a style since removed from the server
        guild = await session.get(Guild, GUILD_ID)
        assert guild is not None
        guild.style_roles = {**guild.style_roles, "gone": [ARTISTS_ROLE]}
    undone = await answer(harness, await style_role(harness, "gone", allow=False))
    assert "style gone: no longer reserved for role artists" in undone["content"]
    async with harness.database.session() as session:
        guild = await session.get(Guild, GUILD_ID)
        assert guild is not None and guild.style_roles == {"style-01": [ARTISTS_ROLE]}


async def test_a_policy_too_long_for_a_message_is_shortened(harness: Harness) -> None:
    await harness.start_bot()  # no worker: nothing here needs one
    policy = partial(harness.fake.slash, "policy", by=MOD, permissions=MANAGE_GUILD)
    words = ", ".join(f"forbidden-word-{number:03}" for number in range(MAX_BANNED))
    await answer(harness, await policy(subcommand="ban", options={"words": words}))
    async with harness.database.session() as session:
        guild = await session.get(Guild, GUILD_ID)
        assert guild is not None
        guild.style_roles = {
            f"style-{number:02d}": [ARTISTS_ROLE + role for role in range(3)]
            for number in range(30)
        }

    for asked in (
        await policy(subcommand="nsfw", options={"where": "allow"}),
        await policy(subcommand="show"),
    ):
        content = (await answer(harness, asked))["content"]
        assert len(content) <= 2000
        assert content.endswith("\n… (shortened to fit a message)")
        assert "Style `style-00`" in content
    async with harness.database.session() as session:
        guild = await session.get(Guild, GUILD_ID)
        assert guild is not None and guild.nsfw_policy.value == "allow"
