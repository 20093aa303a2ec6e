"""``imagine bot`` and ``imagine invite``: the Discord side from the command line."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, Any

from storage.errors import ConfigError, ImagineError
from storage.families import configured_family
from storage.settings import Settings, load_settings

if TYPE_CHECKING:
    from storage.deployment import Deployment

log = logging.getLogger("bot.cli")

TOKEN_HELP = """\
No Discord bot token is set. To get one:
  1. Open https://discord.com/developers/applications and press "New Application".
  2. Under "Bot", press "Reset Token" and copy the token.
  3. export DISCORD_TOKEN=<the token>   (or IMAGINE_DISCORD_TOKEN, or discord_token in imagine.toml)
  4. Run `imagine invite` and open the URL it prints to add the bot to your server.
Then run `imagine bot` again."""


def register(commands: Any) -> None:
    bot = commands.add_parser(
        "bot",
        help="run the Discord bot (embedded worker with SQLite; bot only with PostgreSQL)",
    )
    bot.set_defaults(handler=_bot)
    invite = commands.add_parser("invite", help="print the URL that adds the bot to a server")
    invite.add_argument(
        "--client-id", type=int, help="the application id (default: read from the token)"
    )
    invite.set_defaults(handler=_invite)


# -- invite -----------------------------------------------------------------------------------


def client_id_from_token(token: str) -> int | None:
    """A bot token's first part is the bot's user id (= application id) in base64."""
    first = token.split(".", 1)[0]
    try:
        decoded = base64.b64decode(first + "=" * (-len(first) % 4), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return int(decoded) if decoded.isdigit() else None


def invite_url(client_id: int) -> str:
    import discord

    permissions = discord.Permissions(
        view_channel=True,
        send_messages=True,
        embed_links=True,
        attach_files=True,
        read_message_history=True,
    )
    return discord.utils.oauth_url(
        client_id, permissions=permissions, scopes=("bot", "applications.commands")
    )


def _invite(args: argparse.Namespace) -> int:
    client_id = args.client_id
    if client_id is None:
        token = load_settings().discord_token
        if not token:
            raise ConfigError(
                "Give --client-id (the Application ID on the application's General "
                "Information page) or set DISCORD_TOKEN."
            )
        client_id = client_id_from_token(token)
        if client_id is None:
            raise ConfigError(
                "DISCORD_TOKEN does not look like a bot token; copy it again from the "
                "Bot page, or give --client-id."
            )
    print(invite_url(client_id))
    return 0


# -- bot ----------------------------------------------------------------------------------------


def _bot(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not settings.discord_token:
        raise ConfigError(TOKEN_HELP)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.getLogger("bot").setLevel(level)
    logging.getLogger("generation").setLevel(level)
    return asyncio.run(run_bot(settings))


async def run_bot(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT: the bot, and in the embedded mode the worker beside it."""
    import aiohttp
    import discord

    from bot.app import ImagineBot
    from bot.deployment import open_deployment
    from bot.services import Services
    from generation.styles import StyleRegistry  # torch-free

    assert settings.discord_token is not None
    registry = StyleRegistry.from_folder(settings.resolved_styles_dir)
    for problem in registry.problems:
        log.warning("style skipped: %s", problem)
    stop = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    async with open_deployment(settings) as deployment:
        if deployment.bot_runs_worker:
            worker = _embedded_worker(deployment, stop)
            background.append(asyncio.create_task(worker, name="the embedded worker"))
        if settings.web_port:
            from bot.web.server import gallery_app, serve

            app = gallery_app(deployment, registry)
            web = serve(app, settings.web_host, settings.web_port, stop)
            background.append(asyncio.create_task(web, name="the web gallery"))
            log.info("web gallery on http://%s:%d", settings.web_host, settings.web_port)
        services = Services.for_deployment(
            deployment, registry, configured_family(settings.model, settings.model_family)
        )
        bot = ImagineBot(services)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            async with bot:
                running = asyncio.create_task(bot.start(settings.discord_token))
                stopping = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait(
                    {running, stopping, *background}, return_when=asyncio.FIRST_COMPLETED
                )
                if running in done:
                    running.result()  # a login failure surfaces here
                stopping.cancel()
                log.info("stopping: the job in hand finishes first")
                stop.set()
                await asyncio.gather(*background, return_exceptions=True)
                # Ended before the stop, or failed on the way out.
                ended = [
                    task
                    for task in background
                    if task in done or (not task.cancelled() and task.exception())
                ]
                if ended:  # no bot stays online taking jobs that nothing runs
                    raise _ended_early(ended[0])
        except discord.LoginFailure:
            raise ConfigError(
                "Discord refused the token; copy it again from the Bot page of your application."
            ) from None
        except (aiohttp.ClientConnectionError, discord.GatewayNotFound) as exc:
            raise ImagineError(
                f"Cannot reach Discord ({exc}); check this machine's network connection and "
                "proxy, then run `imagine bot` again."
            ) from None
        finally:
            stop.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
    return 0


def _ended_early(task: asyncio.Task[None]) -> ImagineError:
    """Why the bot exits when ``task`` (its worker or web gallery) ended before a stop:
    its own sentence, or the error (logged with its traceback) and where to look."""
    failure = None if task.cancelled() else task.exception()
    if isinstance(failure, ImagineError):
        reason = str(failure)
    elif failure is not None:
        log.error("%s failed", task.get_name(), exc_info=failure)
        reason = f"{type(failure).__name__}: {failure} (its traceback is in the log above)."
    else:
        reason = "It ended without an error."
    return ImagineError(f"The bot stopped, because {task.get_name()} stopped. {reason}")


async def _embedded_worker(deployment: Deployment, stop: asyncio.Event) -> None:
    """Load the model off the event loop (the bot is online meanwhile), then run jobs."""
    from bot.cli.engine import load_engine, stored_style_rank
    from generation.worker import Worker

    rank = await stored_style_rank(deployment)
    engine = await asyncio.to_thread(load_engine, deployment.settings, rank)
    seconds = await asyncio.to_thread(engine.warm_up)
    worker = Worker.for_deployment(
        deployment, engine, name=f"{socket.gethostname()}-{os.getpid()}-bot"
    )
    log.info(
        "embedded worker ready: %s on %s, warmed up in %.2fs",
        engine.model_id,
        engine.device,
        seconds,
    )
    await worker.run(stop)
