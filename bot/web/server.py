"""Serving the gallery on uvicorn inside an event loop someone else owns (``imagine web``,
or ``imagine bot`` with IMAGINE_WEB_PORT), stopped by that owner's stop event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence

import uvicorn
from starlette.applications import Starlette

from bot.web.app import FolderStyle, create_app
from generation.styles import StyleRegistry
from storage.deployment import Deployment
from storage.errors import ConfigError

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process's owner handles SIGTERM/SIGINT and sets the stop event.
        yield


def folder_styles(styles: StyleRegistry) -> Sequence[FolderStyle]:
    """The styles folder's styles as the styles page shows them (name, description, words)."""
    specs = [styles.get(name) for name in styles.names()]
    return [(spec.name, spec.description, spec.trigger_words) for spec in specs]


def gallery_app(deployment: Deployment, styles: StyleRegistry) -> Starlette:
    settings = deployment.settings
    return create_app(
        deployment.database,
        deployment.blobs,
        public_url=settings.public_url,
        requests_per_minute=settings.web_requests_per_minute,
        folder_styles=lambda: folder_styles(styles),
    )


async def serve(app: Starlette, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve ``app`` until ``stop`` is set; a port that cannot be opened is a ConfigError."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", proxy_headers=True, server_header=False
    )
    server = _Server(config)

    async def run() -> None:
        try:
            await server.serve()
        except SystemExit:
            # uvicorn's answer to a port it cannot open; caught inside the task, because
            # asyncio lets SystemExit escape a task and stop the whole event loop.
            raise ConfigError(
                f"The web gallery cannot listen on {host}:{port} (in use, or not allowed); "
                "pick another with IMAGINE_WEB_PORT or --port."
            ) from None

    serving = asyncio.create_task(run(), name="imagine-web")
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
    await serving
