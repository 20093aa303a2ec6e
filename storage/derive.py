"""Recipes derived from earlier work: variations, upscales, rerolls and remixes.

One place for "what does V3 / Upscale 2× / 🔄 ask for", shared by the Discord
buttons and the local commands. Torch-free: the bot imports it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from storage.errors import ImagineError
from storage.models import Image
from storage.recipe import Recipe, random_seed

SUBTLE_VARIATION_STRENGTH = 0.35
STRONG_VARIATION_STRENGTH = 0.7
UPSCALE_STRENGTH = 0.3
UPSCALE_FACTOR = 2


def _derive(parent: Recipe, what: str, **update: Any) -> Recipe:
    try:
        return Recipe.model_validate({**parent.model_dump(), **update})
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(part) for part in problem["loc"])
        raise ImagineError(f"Cannot make {what}: {field} {problem['msg'].lower()}.") from None


def variation_recipe(
    parent: Recipe, image: Image, *, strong: bool, seed: int | None = None
) -> Recipe:
    """A grid of variations of one image; strong moves further from it than subtle."""
    return _derive(
        parent,
        "variations of this image",
        seed=random_seed() if seed is None else seed,
        count=4,
        width=image.width,
        height=image.height,
        strength=STRONG_VARIATION_STRENGTH if strong else SUBTLE_VARIATION_STRENGTH,
        source_image_id=image.id,
        scale=None,
    )


def upscale_recipe(parent: Recipe, image: Image) -> Recipe:
    """One image at twice the side of ``image``, detail refined with the image's own seed."""
    return _derive(
        parent,
        f"a {UPSCALE_FACTOR}× upscale of this {image.width}×{image.height} image",
        seed=image.seed,
        count=1,
        width=image.width * UPSCALE_FACTOR,
        height=image.height * UPSCALE_FACTOR,
        scale=UPSCALE_FACTOR,
        strength=UPSCALE_STRENGTH,
        source_image_id=image.id,
        controls=(),  # the detail pass runs without them; the image it starts from had them
    )


def reroll_recipe(parent: Recipe, seed: int | None = None) -> Recipe:
    """The same recipe from new noise."""
    return _derive(parent, "a reroll", seed=random_seed() if seed is None else seed)


def remix_base(parent: Recipe) -> Recipe:
    """What a remix starts from: the parent's text-to-image recipe (no source image)."""
    return _derive(parent, "a remix", strength=None, source_image_id=None, scale=None)
