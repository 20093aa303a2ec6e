"""Composing a generation's images into the one grid image posted to Discord.

The worker composes a generation's grid once and stores it as a blob beside its tiles
(``Generation.grid_blob_key``); readers only fetch it. A generation of one image has no grid.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from generation.metadata import encode_png
from storage.generations import record_grid
from storage.recipe import Recipe

if TYPE_CHECKING:
    from storage.blobs import BlobStore
    from storage.database import Database
    from storage.models import Generation


class HasImage(Protocol):
    @property
    def image(self) -> Image.Image: ...


def grid_shape(count: int) -> tuple[int, int]:
    """(columns, rows): 2×2 for four, one row for up to three, near-square beyond."""
    if count <= 3:
        return count, 1
    columns = math.ceil(math.sqrt(count))
    return columns, math.ceil(count / columns)


def compose_grid_image(images: Sequence[Image.Image]) -> Image.Image:
    if not images:
        raise ValueError("a grid needs at least one image")
    width, height = images[0].size
    columns, rows = grid_shape(len(images))
    grid = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


def compose_grid(images: Sequence[HasImage], recipe: Recipe, sampler: str | None = None) -> bytes:
    """The grid as PNG bytes carrying the generation's recipe.

    ``recipe`` is the completed one (``Engine.complete_recipe``): its sampler names what
    ran, so the grid's ``parameters`` say what its tiles say. ``sampler`` (A1111's name,
    ``Engine.a1111_sampler``) is needed only for a model whose own scheduler is off the list.
    """
    return encode_png(
        compose_grid_image([generated.image for generated in images]), recipe, sampler
    )


def compose_grid_from_pngs(tiles: Sequence[bytes], recipe: Recipe) -> bytes:
    """The grid of stored tiles, as :func:`compose_grid` makes it from the engine's images."""
    images = [Image.open(io.BytesIO(data)) for data in tiles]
    try:
        return encode_png(compose_grid_image(images), recipe)
    finally:
        for image in images:
            image.close()


async def stored_grid_key(database: Database, blobs: BlobStore, generation: Generation) -> str:
    """The blob key of a finished generation's grid.

    A generation finished before grids were stored (migration 0009) has none: its grid is
    composed from its tiles here, once, then stored and recorded like the worker's.
    """
    if generation.grid_blob_key is not None:
        return generation.grid_blob_key
    tiles = [
        await blobs.get(image.blob_key)
        for image in sorted(generation.images, key=lambda image: image.index)
    ]
    grid = await asyncio.to_thread(compose_grid_from_pngs, tiles, generation.recipe)
    key = await blobs.put(grid)
    async with database.session() as session:
        await record_grid(session, generation.id, key)
    return key
