"""Composing a generation's images into the one grid image posted to Discord."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from PIL import Image

from generation.metadata import encode_png
from storage.recipe import Recipe


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
    grid = compose_grid_image([generated.image for generated in images])
    return encode_png(grid, recipe, sampler)
