"""Members' images: fetched only from Discord, within a size cap, then made safe and stored.

An image comes as an attachment of a command or as a Discord link at the start of a
prompt. Either way the bytes are downloaded from an allowed origin only
(``IMAGINE_IMAGE_ORIGINS``: Discord's CDN), so a prompt cannot make the bot fetch
anything else (no server-side request forgery): redirects are not followed, the
declared size is checked before the download and the running size during it, and
nothing is decompressed on the way. :mod:`storage.intake` then decodes, checks and
normalises the image, and it is kept in the blob store before anything is queued.
"""

from __future__ import annotations

import asyncio

import aiohttp
import discord

from bot.services import Services
from storage.intake import ImageRefused, IntakeLimits, intake_image, store_image
from storage.recipe import ImageRef
from storage.settings import url_origin

FETCH_TIMEOUT_SECONDS = 30.0
CHUNK_BYTES = 64 * 1024


def allowed_origin(url: str, origins: tuple[str, ...]) -> bool:
    origin = url_origin(url)
    return origin is not None and origin in origins


def not_from_discord(origins: tuple[str, ...]) -> ImageRefused:
    return ImageRefused(
        "Imagine only fetches images from Discord ("
        + ", ".join(origins)
        + "); attach the image to the command, or paste its Discord link."
    )


async def download(
    url: str,
    limits: IntakeLimits,
    origins: tuple[str, ...],
    *,
    declared_size: int | None = None,
    what: str = "The image",
) -> bytes:
    """The bytes at ``url``, an allowed origin's, at most ``limits.max_bytes`` of them."""
    if not allowed_origin(url, origins):
        raise not_from_discord(origins)
    if declared_size is not None:
        limits.check_size(declared_size, what)
    unreachable = ImageRefused(
        f"{what} could not be downloaded from Discord; its link may have expired. "
        "Attach it again, or paste a fresh link."
    )
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
    try:
        # auto_decompress off: the cap counts the bytes that travel, not what they inflate to.
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False, auto_decompress=False) as http,
            http.get(url, allow_redirects=False) as response,
        ):
            if 300 <= response.status < 400:
                raise ImageRefused(
                    f"{what}'s link leads somewhere else; Imagine does not follow it. "
                    "Attach the image itself."
                )
            if response.status != 200:
                raise unreachable
            if response.content_length is not None:
                limits.check_size(response.content_length, what)
            received = bytearray()
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                received += chunk
                if len(received) > limits.max_bytes:
                    limits.check_size(len(received), what)
            return bytes(received)
    except (aiohttp.ClientError, TimeoutError):
        raise unreachable from None


async def receive_image(
    services: Services,
    *,
    attachment: discord.Attachment | None = None,
    url: str | None = None,
) -> ImageRef:
    """The attachment's or the link's image, checked, normalised and kept in the blob store."""
    settings = services.settings
    limits = IntakeLimits.from_settings(settings)
    origins = settings.allowed_image_origins
    if attachment is not None:
        what = f"The attached file {attachment.filename}"[:120]
        data = await download(
            attachment.url, limits, origins, declared_size=attachment.size, what=what
        )
    else:
        assert url is not None
        what = "The linked image"
        data = await download(url, limits, origins, what=what)
    image = await asyncio.to_thread(intake_image, data, limits, what)
    return await store_image(services.blobs, image)
