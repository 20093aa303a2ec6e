"""Zoom Out and Pan: larger canvases around an image, its own pixels kept, the rest new."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from generation.engine import Engine, outpaint_canvas
from storage.derive import (
    PAN_DIRECTIONS,
    ZOOM_FACTORS,
    outpaint_recipe,
    pan_margins,
    remix_base,
    upscale_recipe,
    variation_recipe,
    zoom_margins,
)
from storage.errors import ImagineError
from storage.models import Image as ImageRow
from storage.recipe import Outpaint, Recipe

SIDES = st.integers(min_value=8, max_value=512).map(lambda n: n * 8)


def parent(width: int = 64, height: int = 64, model: str = "tiny") -> Recipe:
    return Recipe(
        model=model,
        prompt="a lighthouse on a cliff",
        seed=3,
        width=width,
        height=height,
        steps=4,
        guidance=5.0,
        aspect_ratio="1:1",
    )


def image_row(width: int, height: int, image_id: int = 11) -> ImageRow:
    return ImageRow(id=image_id, width=width, height=height, seed=3, index=0, blob_key="k")


@given(width=SIDES, height=SIDES, factor=st.sampled_from(ZOOM_FACTORS))
def test_zoom_out_centres_the_source_on_a_larger_canvas(
    width: int, height: int, factor: float
) -> None:
    margins = zoom_margins(width, height, factor)
    canvas = (width + margins.left + margins.right, height + margins.top + margins.bottom)
    assert canvas[0] % 8 == 0 and canvas[1] % 8 == 0
    assert abs(canvas[0] - width * factor) <= 4 and abs(canvas[1] - height * factor) <= 4
    assert abs(margins.left - margins.right) <= 1 and abs(margins.top - margins.bottom) <= 1


@given(width=SIDES, height=SIDES, direction=st.sampled_from(PAN_DIRECTIONS))
def test_pan_adds_half_a_side_in_one_direction(width: int, height: int, direction: str) -> None:
    margins = pan_margins(width, height, direction)
    added = {"left": margins.left, "right": margins.right, "up": margins.top}
    added["down"] = margins.bottom
    side = width if direction in {"left", "right"} else height
    assert abs(added.pop(direction) - side / 2) <= 4
    assert set(added.values()) == {0}


def test_a_canvas_over_the_largest_side_is_refused_with_a_sentence() -> None:
    big = image_row(3072, 3072)
    with pytest.raises(ImagineError, match=r"6144×6144.*at most 4096 pixels a side"):
        outpaint_recipe(parent(), big, zoom_margins(3072, 3072, 2.0))
    with pytest.raises(ImagineError, match="Pan goes left, right, up, down"):
        pan_margins(64, 64, "sideways")


def test_outpaint_recipes_and_what_derives_from_them() -> None:
    source = image_row(64, 96)
    zoomed = outpaint_recipe(parent(64, 96), source, zoom_margins(64, 96, 1.5), seed=5)
    assert (zoomed.width, zoomed.height, zoomed.count) == (96, 144, 4)
    assert zoomed.source_image_id == 11 and zoomed.aspect_ratio == "1:1"
    assert zoomed.outpaint is not None and zoomed.outpaint.action == "zoom 1.5"
    panned = outpaint_recipe(parent(64, 96), source, pan_margins(64, 96, "right"))
    assert (panned.width, panned.height, panned.aspect_ratio) == (96, 96, None)
    assert Recipe.from_json(zoomed.to_json()) == zoomed  # the margins survive storage
    # A tile of a zoomed grid is varied, upscaled and remixed as an ordinary image.
    tile = image_row(96, 144, image_id=12)
    for derived in (
        variation_recipe(zoomed, tile, strong=False),
        upscale_recipe(zoomed, tile),
        remix_base(zoomed),
    ):
        assert derived.outpaint is None


def test_the_mask_covers_the_new_area_and_overlaps_the_source_only_where_extended() -> None:
    source = Image.new("RGB", (64, 48), (200, 10, 10))
    canvas, mask = outpaint_canvas(source, Outpaint(left=32, top=0, right=0, bottom=16))
    assert canvas.size == mask.size == (96, 64)
    painted = np.asarray(mask) > 0
    # The new area (left 32 px, bottom 16 px) and 8 px of overlap into the source there.
    assert painted[:, :40].all() and painted[40:, :].all()
    assert not painted[:40, 40:].any()  # the rest of the source is kept as it is
    assert (np.asarray(canvas)[:, :32] == (200, 10, 10)).all()  # edges stretched outwards


@pytest.fixture(scope="module")
def source_and_grid(tiny_engine: Engine) -> tuple[Image.Image, Recipe, list[Image.Image]]:
    first = parent().model_copy(update={"count": 1})
    source = tiny_engine.txt2img(first)[0].image
    recipe = outpaint_recipe(first, image_row(64, 64), zoom_margins(64, 64, 2.0), seed=9)
    return source, recipe, [image.image for image in tiny_engine.outpaint(recipe, source)]


def test_zoom_out_keeps_the_source_pixels_and_generates_four_new_surroundings(
    source_and_grid: tuple[Image.Image, Recipe, list[Image.Image]],
) -> None:
    source, recipe, grid = source_and_grid
    margins = recipe.outpaint
    assert margins is not None and len(grid) == 4
    for image in grid:
        pixels = np.asarray(image)
        assert image.size == (128, 128)
        kept = pixels[margins.top : margins.top + 64, margins.left : margins.left + 64]
        assert np.array_equal(kept, np.asarray(source))
        assert pixels[: margins.top].std() > 5  # generated, not the stretched edge
    assert not np.array_equal(np.asarray(grid[0]), np.asarray(grid[1]))


def test_an_outpaint_tile_regenerates_alone_and_the_grid_again(
    tiny_engine: Engine, source_and_grid: tuple[Image.Image, Recipe, list[Image.Image]]
) -> None:
    source, recipe, grid = source_and_grid
    alone = tiny_engine.outpaint(
        recipe.model_copy(update={"count": 1, "seed": recipe.seed_for(2)}), source
    )[0].image
    difference = np.abs(np.asarray(alone, dtype=np.int16) - np.asarray(grid[2], dtype=np.int16))
    assert difference.max() <= 2  # batched matmuls may round differently (engine tests: 2)
    again = tiny_engine.outpaint(recipe, source)
    for image, before in zip(again, grid, strict=True):
        assert np.array_equal(np.asarray(image.image), np.asarray(before))


def test_a_canvas_that_does_not_match_its_source_is_refused(
    tiny_engine: Engine, source_and_grid: tuple[Image.Image, Recipe, list[Image.Image]]
) -> None:
    source, recipe, _ = source_and_grid
    with pytest.raises(ImagineError, match="with its margins makes"):
        tiny_engine.outpaint(recipe, source.resize((32, 32)))
