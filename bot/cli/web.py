"""``imagine web`` (the gallery on its own) and ``imagine thumbnails`` (the backfill)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from storage.settings import Settings, load_settings

log = logging.getLogger("bot.cli")
DEFAULT_PORT = 8080


def register(commands: Any) -> None:
    web = commands.add_parser(
        "web", help="serve the web gallery (read-only; servers opt in with /policy web on)"
    )
    web.add_argument("--host", help="address to listen on (default: IMAGINE_WEB_HOST)")
    web.add_argument(
        "--port",
        type=int,
        help=f"port to listen on (default: IMAGINE_WEB_PORT, else {DEFAULT_PORT})",
    )
    web.set_defaults(handler=_web)
    thumbnails = commands.add_parser(
        "thumbnails", help="make the web gallery's thumbnails of images made before it"
    )
    thumbnails.set_defaults(handler=_thumbnails)


def _web(args: argparse.Namespace) -> int:
    settings = load_settings()
    host = args.host or settings.web_host
    port = args.port if args.port is not None else settings.web_port or DEFAULT_PORT
    return asyncio.run(run_web(settings, host, port))


async def run_web(settings: Settings, host: str, port: int) -> int:
    from bot.deployment import open_deployment
    from bot.web.server import gallery_app, serve
    from generation.styles import StyleRegistry  # torch-free

    registry = StyleRegistry.from_folder(settings.resolved_styles_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with open_deployment(settings) as deployment:
        print(f"Serving the web gallery on http://{host}:{port}/g/<server id>", flush=True)
        await serve(gallery_app(deployment, registry), host, port, stop)
    return 0


def _thumbnails(args: argparse.Namespace) -> int:
    return asyncio.run(run_thumbnails(load_settings()))


async def run_thumbnails(settings: Settings) -> int:
    from bot.deployment import open_deployment
    from generation.thumbnails import backfill_thumbnails

    async with open_deployment(settings) as deployment:
        done, skipped = await backfill_thumbnails(deployment.database, deployment.blobs)
    print(f"Made thumbnails for {done} image(s); {skipped} had no readable PNG.")
    return 0
