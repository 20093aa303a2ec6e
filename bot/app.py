"""The Discord client: cogs, persistent buttons, command sync, and result delivery.

:class:`ImagineBot` takes a :class:`~bot.services.Services` and knows nothing of
how jobs run: in the embedded mode the worker runs in the same process (see
:func:`bot.cli.discord_commands.run_bot`), in the scaled mode elsewhere.
Community features arrive as further cogs added in :meth:`ImagineBot.setup_hook`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import discord
from discord.ext import commands

from bot.delivery import Delivery
from bot.services import Services
from bot.views import ButtonActions, GridButton, ImageButton, remix_submission, try_submission

log = logging.getLogger(__name__)


class ImagineBot(commands.Bot):
    def __init__(self, services: Services, *, sync_commands: bool = True) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.services = services
        self.delivery = Delivery(self, services)
        self.sync_commands = sync_commands
        self.synced = 0
        self.started = time.perf_counter()
        self._delivering: asyncio.Task[None] | None = None
        self.actions: ButtonActions
        # Personal defaults, read before the first await of /imagine: kept in memory.
        self.user_defaults: dict[int, dict[str, Any]] = {}

    async def setup_hook(self) -> None:
        from bot.cogs.community import PolicyCog, SettingsCog
        from bot.cogs.gallery import GalleryCog, GalleryImageButton, GalleryPageButton
        from bot.cogs.imagine import ImagineCog
        from bot.cogs.styles import StylePageButton, StylesCog, TryStyleButton
        from storage.community import all_user_defaults
        from storage.style_store import all_guild_style_names

        async with self.services.database.session() as session:
            self.user_defaults = await all_user_defaults(session)
            self.services.guild_style_names = await all_guild_style_names(session)
        cog = ImagineCog(self)
        await self.add_cog(cog)
        self.actions = cog
        await self.add_cog(SettingsCog(self))
        await self.add_cog(PolicyCog(self))
        await self.add_cog(GalleryCog(self))
        self.add_dynamic_items(GalleryPageButton, GalleryImageButton)
        await self.add_cog(StylesCog(self))
        self.add_dynamic_items(StylePageButton, TryStyleButton)
        self.add_dynamic_items(GridButton, ImageButton)
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
        assert self.user is not None
        log.info(
            "ready as %s (id %s) in %d server(s); %d commands synced; started in %.1fs",
            self.user,
            self.user.id,
            len(self.guilds),
            self.synced,
            time.perf_counter() - self.started,
        )

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        # Modals are answered here, not by the Modal objects, so that one opened before a
        # restart still works after it.
        submitted = remix_submission(interaction)
        if submitted is not None:
            await self.actions.remix_submitted(interaction, *submitted)
            return
        tried = try_submission(interaction)
        if tried is not None:
            from bot.cogs.styles import StylesCog

            cog = self.get_cog("StylesCog")
            assert isinstance(cog, StylesCog)
            await cog.try_submitted(interaction, tried[1])

    async def close(self) -> None:
        if self._delivering is not None:
            self._delivering.cancel()
            await asyncio.gather(self._delivering, return_exceptions=True)
        await self.delivery.idle()
        await super().close()
