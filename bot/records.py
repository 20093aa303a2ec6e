"""A generation or an image by an id a user handed in (a button's, an option's).

Ids come from ``custom_id`` text, which anyone can craft: one beyond the
database's 64-bit keys names nothing, and gets the same sentence as any other
unknown id instead of an ``OverflowError`` from the driver.
"""

from __future__ import annotations

from storage.database import Database
from storage.errors import NotFound
from storage.generations import get_generation, get_image
from storage.models import Generation, Image

MAX_ID = 2**63 - 1


async def load_generation(database: Database, generation_id: int) -> Generation:
    if not 0 < generation_id <= MAX_ID:
        raise NotFound(f"There is no generation {generation_id}; check the id.")
    async with database.session() as session:
        return await get_generation(session, generation_id)


async def load_image(database: Database, image_id: int) -> tuple[Image, Generation]:
    """The image and the generation it belongs to."""
    if not 0 < image_id <= MAX_ID:
        raise NotFound(f"There is no image {image_id}; check the id.")
    async with database.session() as session:
        image = await get_image(session, image_id)
        return image, await get_generation(session, image.generation_id)
