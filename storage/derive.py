"""Recipes derived from earlier work: variations, upscales, rerolls and remixes.

One place for "what does V3 / Upscale 2× / 🔄 ask for", shared by the Discord
buttons and the local commands. Torch-free: the bot imports it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from storage.errors import ImagineError
from storage.families import ModelFamily, guess_family, size_for
from storage.models import Image
from storage.recipe import MAX_IMAGE_WEIGHT, MAX_SIDE, ImageRef, Outpaint, Recipe, random_seed

SUBTLE_VARIATION_STRENGTH = 0.35
STRONG_VARIATION_STRENGTH = 0.7
UPSCALE_STRENGTH = 0.3
UPSCALE_FACTOR = 2
ZOOM_FACTORS = (1.5, 2.0)
PAN_DIRECTIONS = ("left", "right", "up", "down")
DEFAULT_IMAGE_WEIGHT = 1.0
# --iw 0 … 2 is img2img strength 1.0 … 0.2: each unit of weight keeps 0.4 more of the image.
IMAGE_WEIGHT_STRENGTH_STEP = 0.4
MAX_IMAGE_RATIO = 4.0  # an image prompt's shape is followed up to 4:1 (as --ar allows)


def image_prompt_strength(image_weight: float) -> float:
    """The img2img strength of an image prompt at ``--iw image_weight``: the one mapping.

    ``--iw 0`` → 1.0 (the image barely shows through the noise), ``--iw 1`` (default) → 0.6,
    ``--iw 2`` → 0.2 (the result stays close to the image).
    """
    if not 0.0 <= image_weight <= MAX_IMAGE_WEIGHT:
        raise ImagineError(f"--iw must be from 0 to {MAX_IMAGE_WEIGHT:g}, not {image_weight:g}.")
    return round(1.0 - IMAGE_WEIGHT_STRENGTH_STEP * image_weight, 6)


def image_prompt_size(image: ImageRef, family: ModelFamily) -> tuple[int, int]:
    """The size of a generation that follows ``image``'s shape (limited to 4:1 either way)
    at the family's pixel budget."""
    ratio = (image.width, image.height)
    if image.width > MAX_IMAGE_RATIO * image.height:
        ratio = (int(MAX_IMAGE_RATIO), 1)
    elif image.height > MAX_IMAGE_RATIO * image.width:
        ratio = (1, int(MAX_IMAGE_RATIO))
    return size_for(ratio, family)


def with_image_prompt(
    recipe: Recipe, image: ImageRef, image_weight: float | None, family: ModelFamily
) -> Recipe:
    """``recipe`` steered by ``image``: img2img at the strength ``--iw`` maps to, at the
    image's shape unless the recipe has an ``--ar``."""
    weight = DEFAULT_IMAGE_WEIGHT if image_weight is None else image_weight
    update: dict[str, Any] = {
        "init_image": image,
        "image_weight": weight,
        "strength": image_prompt_strength(weight),
    }
    if recipe.aspect_ratio is None:
        update["width"], update["height"] = image_prompt_size(image, family)
    return _derive(recipe, "an image prompt", **update)


def family_of(recipe: Recipe) -> ModelFamily:
    """The family ``recipe`` was made for: the one it names, else the guess from its model."""
    return recipe.family or guess_family(recipe.model)


def _derive(parent: Recipe, what: str, **update: Any) -> Recipe:
    try:
        return Recipe.model_validate({**parent.model_dump(), **update})
    except ValidationError as exc:
        problem = exc.errors()[0]
        if problem["type"] == "value_error":  # the recipe's own check: a whole sentence
            reason = str(problem["ctx"]["error"]).rstrip(".")
            raise ImagineError(f"Cannot make {what}: {reason}.") from None
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
        outpaint=None,
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
        outpaint=None,
        controls=(),  # the detail pass runs without them; the image it starts from had them
    )


def _made_sides(parent: Recipe) -> dict[str, int]:
    """The sides the family made of ``parent``'s: a row from before sides were kept to the
    family's size step (a FLUX 1256×840, which diffusers made 1248×832) is rounded down
    as the image was, so what derives from it fits the step."""
    family = parent.family
    if family is None:
        return {}
    step = family.size_step
    return {
        "width": max(step, parent.width // step * step),
        "height": max(step, parent.height // step * step),
    }


def reroll_recipe(parent: Recipe, seed: int | None = None) -> Recipe:
    """The same recipe from new noise."""
    seed = random_seed() if seed is None else seed
    return _derive(parent, "a reroll", seed=seed, **_made_sides(parent))


def remix_base(parent: Recipe) -> Recipe:
    """What a remix starts from: the parent's text-to-image recipe (no source image), with
    its image prompt if it had one."""
    strength = None
    if parent.init_image is not None and parent.image_weight is not None:
        strength = image_prompt_strength(parent.image_weight)
    return _derive(
        parent,
        "a remix",
        **_made_sides(parent),
        strength=strength,
        source_image_id=None,
        scale=None,
        outpaint=None,
    )


def _steps(value: float, family: ModelFamily) -> int:
    """``value`` to the nearest multiple of the family's size step (at least one step)."""
    step = family.size_step
    return max(step, round(value / step) * step)


def zoom_margins(width: int, height: int, factor: float, family: ModelFamily) -> Outpaint:
    """The source in the middle of a canvas ``factor`` times its size (sides rounded to the
    family's size step)."""
    if factor not in ZOOM_FACTORS:
        raise ImagineError(f"Zoom Out goes {' or '.join(f'{f:g}×' for f in ZOOM_FACTORS)}.")
    add_w = _steps(width * factor, family) - width
    add_h = _steps(height * factor, family) - height
    left, top = add_w // 2, add_h // 2
    return Outpaint(
        left=left, top=top, right=add_w - left, bottom=add_h - top, action=f"zoom {factor:g}"
    )


def pan_margins(width: int, height: int, direction: str, family: ModelFamily) -> Outpaint:
    """Half a side more canvas in ``direction``: left, right, up or down (rounded to the
    family's size step)."""
    if direction not in PAN_DIRECTIONS:
        raise ImagineError(f"Pan goes {', '.join(PAN_DIRECTIONS)}; not {direction!r}.")
    half_w, half_h = _steps(width / 2, family), _steps(height / 2, family)
    sides = {
        "left": {"left": half_w},
        "right": {"right": half_w},
        "up": {"top": half_h},
        "down": {"bottom": half_h},
    }[direction]
    return Outpaint(
        left=sides.get("left", 0),
        top=sides.get("top", 0),
        right=sides.get("right", 0),
        bottom=sides.get("bottom", 0),
        action=f"pan {direction}",
    )


def outpaint_recipe(
    parent: Recipe, image: Image, margins: Outpaint, *, seed: int | None = None
) -> Recipe:
    """A grid of four larger canvases around ``image``: its pixels kept, the rest new."""
    width = image.width + margins.left + margins.right
    height = image.height + margins.top + margins.bottom
    what = f"a {margins.action} of this {image.width}×{image.height} image"
    if max(width, height) > MAX_SIDE:
        raise ImagineError(
            f"Cannot make {what}: it would be {width}×{height}, and Imagine makes at most "
            f"{MAX_SIDE} pixels a side; zoom or pan from a smaller image (before upscaling)."
        )
    return _derive(
        parent,
        what,
        seed=random_seed() if seed is None else seed,
        count=4,
        width=width,
        height=height,
        aspect_ratio=parent.aspect_ratio if margins.action.startswith("zoom") else None,
        strength=None,
        source_image_id=image.id,
        scale=None,
        outpaint=margins,
        init_image=None,  # the image it starts from is the source, not an image prompt
        image_weight=None,
        controls=(),  # their maps have the source's size, not the canvas's
    )
