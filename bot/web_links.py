"""Links from Discord to the web gallery, given only where a page would answer: the site's
address is set (IMAGINE_PUBLIC_URL), the server turned its gallery on, the image is shown."""

from __future__ import annotations

from urllib.parse import urlencode

from bot.services import Services
from storage.web_gallery import visible_image, web_enabled


async def gallery_link(services: Services, guild_id: int | None, **params: str) -> str | None:
    base = services.settings.public_url
    if base is None or guild_id is None:
        return None
    async with services.database.session() as session:
        if not await web_enabled(session, guild_id):
            return None
    query = urlencode({key: value for key, value in params.items() if value})
    return f"{base}/g/{guild_id}" + (f"?{query}" if query else "")


async def image_link(services: Services, image_id: int) -> str | None:
    base = services.settings.public_url
    if base is None:
        return None
    async with services.database.session() as session:
        if await visible_image(session, image_id) is None:
            return None
    return f"{base}/i/{image_id}"
