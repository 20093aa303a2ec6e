"""The Discord client: cogs, persistent buttons, command sync, and result delivery.

:class:`ImagineBot` takes a :class:`~bot.services.Services` and knows nothing of
how jobs run: in the embedded mode the worker runs in the same process (see
:func:`bot.cli.discord_commands.run_bot`), in the scaled mode elsewhere.
Each feature is a cog module of :mod:`bot.cogs`, loaded as an extension in
:meth:`ImagineBot.setup_hook`; its ``setup`` adds the cog and registers the
dynamic items its buttons are matched by. What several cogs share lives in plain
modules of :mod:`bot` (:mod:`bot.submit`, :mod:`bot.replies`, :mod:`bot.choices`),
so no cog imports another and this module imports none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.delivery import Delivery
from bot.modals import answer_modal
from bot.policies import GuildPolicies
from bot.rate_limit import RateLimiter, Turns
from bot.replies import answer_failure, refuse
from bot.services import Services

log = logging.getLogger(__name__)
SUBMISSIONS_AT_ONCE = 8
# Commands that may wait for a turn: about 11 MiB of interactions at most (see Turns).
SUBMISSIONS_WAITING = 1000
EXTENSIONS = ("bot.cogs.imagine", "bot.cogs.community", "bot.cogs.gallery", "bot.cogs.styles")


class ImagineTree(app_commands.CommandTree["ImagineBot"]):
    async def on_error(
        self, interaction: discord.Interaction[ImagineBot], error: app_commands.AppCommandError, /
    ) -> None:
        command = interaction.command.qualified_name if interaction.command else "?"
        if isinstance(error, app_commands.CheckFailure):
            # A refusal, not a fault: the check has told the member why, or is told here.
            log.info("/%s refused for user %s: %s", command, interaction.user.id, error)
            if not interaction.response.is_done():
                await refuse(
                    interaction,
                    "You may not use this command here; a member who manages the server "
                    "can tell you why.",
                )
            return
        # A sentence for the member (the queue unavailable, say, or a fault that is
        # logged) rather than "The application did not respond".
        await answer_failure(interaction, getattr(error, "original", error), f"/{command}")


class ImagineBot(commands.Bot):
    def __init__(self, services: Services, *, sync_commands: bool = True) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
            tree_cls=ImagineTree,
        )
        self.services = services
        self.delivery = Delivery(self, services)
        self.sync_commands = sync_commands
        self.synced = 0
        self.started = time.perf_counter()
        self._delivering: asyncio.Task[None] | None = None
        self._sweeps: set[asyncio.Task[None]] = set()
        self._readies = 0
        # Personal defaults, read before the first await of /imagine: kept in memory.
        self.user_defaults: dict[int, dict[str, Any]] = {}
        self.rate_limiter = RateLimiter.from_settings(services.settings)
        # Submissions (and the reads of buttons' records) at once: below the connection
        # pool, so that a burst takes turns here and deliveries find connections.
        self.submitting = Turns(SUBMISSIONS_AT_ONCE, SUBMISSIONS_WAITING)
        self.policies = GuildPolicies(services.database)

    async def setup_hook(self) -> None:
        from storage.community import all_user_defaults
        from storage.style_store import all_guild_style_weights

        async with self.services.database.session() as session:
            self.user_defaults = await all_user_defaults(session)
            self.services.guild_style_weights = await all_guild_style_weights(session)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        if self.sync_commands:
            self.synced = len(await self.tree.sync())
        self._delivering = asyncio.create_task(self._deliver(), name="imagine-delivery")

    async def _deliver(self) -> None:
        while True:
            try:
                await self.delivery.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the event stream broke; reconnecting in 1 s")
                await asyncio.sleep(1)

    async def on_ready(self) -> None:
        self._readies += 1
        if self._readies > 1:  # the first session's sweep is the delivery loop's own
            self._sweep("a new gateway session began")
            return
        assert self.user is not None
        log.info(
            "ready as %s (id %s) in %d server(s); %d commands synced; started in %.1fs",
            self.user,
            self.user.id,
            len(self.guilds),
            self.synced,
            time.perf_counter() - self.started,
        )

    async def on_resumed(self) -> None:
        self._sweep("the gateway resumed")

    def _sweep(self, why: str) -> None:
        # Discord is back: results whose delivery gave up during the outage go out now.
        log.info("%s; delivering what is not delivered yet", why)
        task = asyncio.create_task(self.delivery.sweep(), name="imagine-sweep")
        self._sweeps.add(task)
        task.add_done_callback(self._swept)

    def _swept(self, task: asyncio.Task[None]) -> None:
        self._sweeps.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("the delivery sweep failed", exc_info=task.exception())

    async def on_interaction(self, interaction: discord.Interaction[ImagineBot]) -> None:
        # Modals are answered here, not by the Modal objects, so that one opened before a
        # restart still works after it (buttons are matched by their dynamic items).
        await answer_modal(interaction)

    async def close(self) -> None:
        if self._delivering is not None:
            self._delivering.cancel()
            await asyncio.gather(self._delivering, return_exceptions=True)
        await asyncio.gather(*self._sweeps, return_exceptions=True)
        await self.delivery.idle()
        await super().close()
