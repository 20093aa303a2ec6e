"""A generation or an image by an id a user handed in (a button's, an option's), each
read outside a transaction (one round trip a statement). An id that names nothing, however
large, gets :class:`~storage.errors.NotFound` with a sentence from :mod:`storage.generations`.
"""

from __future__ import annotations

from storage.database import Database
from storage.generations import get_generation, get_image
from storage.models import Generation, Image


async def load_generation(database: Database, generation_id: int) -> Generation:
    async with database.autocommit_session() as session:
        return await get_generation(session, generation_id)


async def load_image(database: Database, image_id: int) -> tuple[Image, Generation]:
    """The image and the generation it belongs to."""
    async with database.autocommit_session() as session:
        image = await get_image(session, image_id)
        return image, await get_generation(session, image.generation_id)
