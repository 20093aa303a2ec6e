"""/settings (personal defaults) and /policy (the server's rules, for its managers)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.choices import ASPECT_RATIOS, style_choices, style_refusal
from bot.delivery import MAX_CONTENT
from bot.replies import Refusal
from storage.community import change_policy as record_policy_change
from storage.community import (
    guild_policy as load_guild_policy,
)
from storage.community import (
    policy_changes,
    reset_user_defaults,
    set_user_defaults,
)
from storage.models import Guild, NsfwPolicy

if TYPE_CHECKING:
    from bot.app import ImagineBot

MAX_BANNED = 200
NSFW_CHOICES = [
    app_commands.Choice(name="never", value=NsfwPolicy.BLOCK.value),
    app_commands.Choice(
        name="only in age-restricted channels", value=NsfwPolicy.AGE_RESTRICTED_CHANNELS.value
    ),
    app_commands.Choice(name="everywhere", value=NsfwPolicy.ALLOW.value),
]
ON_OFF = [app_commands.Choice(name="on", value="on"), app_commands.Choice(name="off", value="off")]


# The defaults /settings keeps, as members read them.
SHOWN_DEFAULTS = {
    "style": "style",
    "aspect_ratio": "aspect ratio",
    "steps": "steps",
    "guidance": "guidance",
    "private": "private replies",
}
DEFAULT_CHOICES = [
    app_commands.Choice(name=name, value=key) for key, name in SHOWN_DEFAULTS.items()
]


def describe_defaults(values: dict[str, Any]) -> str:
    if not values:
        return "You have no defaults: /imagine uses the server's."
    lines = [f"• {name}: `{values[key]}`" for key, name in SHOWN_DEFAULTS.items() if key in values]
    return "Your defaults (a flag in the prompt wins over them):\n" + "\n".join(lines)


class SettingsCog(commands.Cog):
    settings = app_commands.Group(name="settings", description="Your defaults for /imagine")

    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.services = bot.services

    @settings.command(name="show", description="Your defaults for /imagine.")
    async def show(self, interaction: discord.Interaction[ImagineBot]) -> None:
        values = self.bot.user_defaults.get(interaction.user.id, {})
        await interaction.response.send_message(describe_defaults(values), ephemeral=True)

    @settings.command(name="set", description="Set defaults used by every /imagine of yours.")
    @app_commands.describe(
        style="A style applied when the prompt names none",
        aspect_ratio="The shape when the prompt gives no --ar",
        steps="Denoising steps when the prompt gives no --steps",
        guidance="Guidance when the prompt gives no --cfg",
        private="Show your results only to you",
    )
    @app_commands.choices(aspect_ratio=ASPECT_RATIOS)
    @app_commands.autocomplete(style=style_choices)
    async def set_(
        self,
        interaction: discord.Interaction[ImagineBot],
        style: str | None = None,
        aspect_ratio: str | None = None,
        steps: app_commands.Range[int, 1, 150] | None = None,
        guidance: app_commands.Range[float, 0.0, 30.0] | None = None,
        private: bool | None = None,
    ) -> None:
        if style is not None and (refusal := style_refusal(interaction, style)) is not None:
            await interaction.response.send_message(refusal, ephemeral=True)
            return
        if all(v is None for v in (style, aspect_ratio, steps, guidance, private)):
            await interaction.response.send_message(
                "Give at least one default to set, e.g. `/settings set aspect_ratio:3:2`.",
                ephemeral=True,
            )
            return
        async with self.services.database.session() as session:
            values = await set_user_defaults(
                session,
                interaction.user.id,
                style=style,
                aspect_ratio=aspect_ratio,
                steps=steps,
                guidance=guidance,
                private=private,
            )
        self.bot.user_defaults[interaction.user.id] = values
        await interaction.response.send_message(describe_defaults(values), ephemeral=True)

    @settings.command(name="reset", description="Forget your defaults, or only one of them.")
    @app_commands.describe(default="Only this default (leave empty to forget them all)")
    @app_commands.choices(default=DEFAULT_CHOICES)
    async def reset(
        self, interaction: discord.Interaction[ImagineBot], default: str | None = None
    ) -> None:
        async with self.services.database.session() as session:
            values = await reset_user_defaults(session, interaction.user.id, default)
        if values:
            self.bot.user_defaults[interaction.user.id] = values
        else:
            self.bot.user_defaults.pop(interaction.user.id, None)
        await interaction.response.send_message(describe_defaults(values), ephemeral=True)


def _words(text: str) -> list[str]:
    return [word.strip().lower() for word in re.split(r"[,\n]", text) if word.strip()]


def fit_message(text: str) -> str:
    """``text`` within Discord's limit for a message, cut at a line and saying so."""
    if len(text) <= MAX_CONTENT:
        return text
    note = "\n… (shortened to fit a message)"
    kept = text[: MAX_CONTENT - len(note)]
    if "\n" in kept:
        kept = kept[: kept.rindex("\n")]
    return kept + note


def describe_policy(guild: Guild, public_url: str | None = None) -> str:
    banned = ", ".join(guild.banned_words) if guild.banned_words else "none"
    nsfw = {
        NsfwPolicy.BLOCK: "never",
        NsfwPolicy.AGE_RESTRICTED_CHANNELS: "only in age-restricted channels",
        NsfwPolicy.ALLOW: "everywhere",
    }[guild.nsfw_policy]
    lines = [
        f"Banned words ({len(guild.banned_words)}): ||{banned[:1200]}||",
        f"NSFW prompts: {nsfw}",
        "Limits per member: "
        f"running {guild.max_running_per_user or 'default'}, "
        f"waiting {guild.max_queued_per_user or 'default'}",
    ]
    for style, roles in sorted((guild.style_roles or {}).items()):
        lines.append(f"Style `{style}`: " + ", ".join(f"<@&{role}>" for role in roles))
    if guild.web_enabled:
        where = f": {public_url}/g/{guild.id}" if public_url else ""
        nsfw_web = "shown" if guild.web_nsfw else "hidden"
        lines.append(f"Web gallery: on{where} (NSFW prompts {nsfw_web})")
    else:
        lines.append("Web gallery: off")
    return "\n".join(lines)


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class PolicyCog(commands.GroupCog, group_name="policy", group_description="This server's rules"):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.services = bot.services
        super().__init__()

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        # Discord hides the command from others, but its permissions can be edited per
        # server: the bot checks again.
        if interaction.guild_id is None or not interaction.permissions.manage_guild:
            await interaction.response.send_message(
                "Only members with the Manage Server permission can change the policy.",
                ephemeral=True,
            )
            return False
        return True

    async def _change(
        self, interaction: discord.Interaction[ImagineBot], change: str, apply: Any
    ) -> None:
        assert interaction.guild_id is not None
        async with self.services.database.session() as session:
            guild = await record_policy_change(
                session, interaction.guild_id, interaction.user.id, change, apply
            )
            text = describe_policy(guild, self.services.settings.public_url)
        self.bot.policies.forget(interaction.guild_id)  # committed: /imagine reads it afresh
        await interaction.response.send_message(fit_message(f"{change}.\n{text}"), ephemeral=True)

    @app_commands.command(name="show", description="The server's rules and their latest changes.")
    async def show(self, interaction: discord.Interaction[ImagineBot]) -> None:
        assert interaction.guild_id is not None
        async with self.services.database.session() as session:
            guild = await load_guild_policy(session, interaction.guild_id)
            changes = await policy_changes(session, interaction.guild_id, limit=5)
        history = "\n".join(
            f"<t:{int(c.at.timestamp())}:R> <@{c.user_id}>: {c.change}" for c in changes
        )
        text = describe_policy(guild, self.services.settings.public_url) + (
            "\nLatest changes:\n" + history if history else ""
        )
        await interaction.response.send_message(fit_message(text), ephemeral=True)

    @app_commands.command(name="ban", description="Refuse prompts with these words.")
    @app_commands.describe(words="Words or phrases, separated by commas")
    async def ban(self, interaction: discord.Interaction[ImagineBot], words: str) -> None:
        new = _words(words)

        def apply(guild: Guild) -> None:
            banned = set(guild.banned_words or []) | set(new)
            if len(banned) > MAX_BANNED:  # refused whole: none silently dropped, none un-banned
                raise Refusal(
                    f"A server can ban at most {MAX_BANNED} words or phrases; this one bans "
                    f"{len(guild.banned_words or [])}, and these would make {len(banned)}. "
                    "Unban some first (/policy unban), or ban fewer at once."
                )
            guild.banned_words = sorted(banned)

        await self._change(interaction, f"banned {len(new)} word(s)", apply)

    @app_commands.command(name="unban", description="Allow these words again.")
    @app_commands.describe(words="Words or phrases, separated by commas")
    async def unban(self, interaction: discord.Interaction[ImagineBot], words: str) -> None:
        gone = set(_words(words))

        def apply(guild: Guild) -> None:
            guild.banned_words = [w for w in guild.banned_words or [] if w not in gone]

        await self._change(interaction, f"unbanned {len(gone)} word(s)", apply)

    @app_commands.command(name="nsfw", description="Where NSFW prompts are allowed.")
    @app_commands.choices(where=NSFW_CHOICES)
    async def nsfw(self, interaction: discord.Interaction[ImagineBot], where: str) -> None:
        mode = NsfwPolicy(where)

        def apply(guild: Guild) -> None:
            guild.nsfw_policy = mode

        await self._change(interaction, f"NSFW prompts: {mode.value}", apply)

    @app_commands.command(
        name="web", description="Show this server's gallery on the web (off by default)."
    )
    @app_commands.choices(state=ON_OFF)
    async def web(self, interaction: discord.Interaction[ImagineBot], state: str) -> None:
        enabled = state == "on"

        def apply(guild: Guild) -> None:
            guild.web_enabled = enabled

        await self._change(interaction, f"web gallery: {state}", apply)

    @app_commands.command(
        name="web-nsfw", description="Show NSFW prompts' images on the web gallery too."
    )
    @app_commands.choices(state=ON_OFF)
    async def web_nsfw(self, interaction: discord.Interaction[ImagineBot], state: str) -> None:
        shown = state == "on"

        def apply(guild: Guild) -> None:
            guild.web_nsfw = shown

        await self._change(interaction, f"NSFW images on the web gallery: {state}", apply)

    @app_commands.command(
        name="limits", description="Jobs one member may have running and waiting."
    )
    @app_commands.describe(
        running="At once (0: the bot's default)", waiting="Waiting (0: the bot's default)"
    )
    async def limits(
        self,
        interaction: discord.Interaction[ImagineBot],
        running: app_commands.Range[int, 0, 20] | None = None,
        waiting: app_commands.Range[int, 0, 100] | None = None,
    ) -> None:
        def apply(guild: Guild) -> None:
            if running is not None:
                guild.max_running_per_user = running or None
            if waiting is not None:
                guild.max_queued_per_user = waiting or None

        await self._change(interaction, f"limits: running {running}, waiting {waiting}", apply)

    @app_commands.command(
        name="style-role", description="Let only a role use a style (or undo it)."
    )
    @app_commands.describe(style="The style", role="The role", allow="Add (true) or remove (false)")
    @app_commands.autocomplete(style=style_choices)
    async def style_role(
        self,
        interaction: discord.Interaction[ImagineBot],
        style: str,
        role: discord.Role,
        allow: bool = True,
    ) -> None:
        def apply(guild: Guild) -> None:
            roles = dict(guild.style_roles or {})
            # Reservations match names exactly: one for no style would reserve nothing. A
            # reservation of a style since removed can still be undone.
            refusal = style_refusal(interaction, style)
            if refusal is not None and (allow or style not in roles):
                raise Refusal(refusal)
            current = set(roles.get(style, []))
            current = current | {role.id} if allow else current - {role.id}
            if current:
                roles[style] = sorted(current)
            else:
                roles.pop(style, None)
            guild.style_roles = roles

        verb = "may use" if allow else "no longer reserved for"
        await self._change(interaction, f"style {style}: {verb} role {role.name}", apply)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(SettingsCog(bot))
    await bot.add_cog(PolicyCog(bot))
