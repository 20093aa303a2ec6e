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
    family_of,
    outpaint_recipe,
    pan_margins,
    remix_base,
    upscale_recipe,
    variation_recipe,
    zoom_margins,
)
from storage.errors import ImagineError
from storage.families import FAMILIES, ModelFamily, guess_family
from storage.models import Image as ImageRow
from storage.recipe import Outpaint, Recipe

TINY_SD, TINY_FLUX = FAMILIES["tiny-sd"], FAMILIES["tiny-flux"]
STEPS = st.integers(min_value=4, max_value=256)  # sides in size steps: 32 to 4096 pixels
# A source of a family's own making: its sides are multiples of the family's size step.
SOURCES = st.sampled_from([TINY_SD, TINY_FLUX]).flatmap(
    lambda family: st.tuples(
        st.just(family),
        STEPS.map(lambda n: n * family.size_step),
        STEPS.map(lambda n: n * family.size_step),
    )
)


def parent(width: int = 64, height: int = 64, model: str = "tiny") -> Recipe:
    return Recipe(
        model=model,
        model_family=guess_family(model).name,
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


@given(source=SOURCES, factor=st.sampled_from(ZOOM_FACTORS))
def test_zoom_out_centres_the_source_on_a_larger_canvas(
    source: tuple[ModelFamily, int, int], factor: float
) -> None:
    family, width, height = source
    step = family.size_step
    margins = zoom_margins(width, height, factor, family)
    canvas = (width + margins.left + margins.right, height + margins.top + margins.bottom)
    assert canvas[0] % step == 0 and canvas[1] % step == 0
    assert abs(canvas[0] - width * factor) <= step / 2
    assert abs(canvas[1] - height * factor) <= step / 2
    assert abs(margins.left - margins.right) <= 1 and abs(margins.top - margins.bottom) <= 1


@given(source=SOURCES, direction=st.sampled_from(PAN_DIRECTIONS))
def test_pan_adds_half_a_side_in_one_direction(
    source: tuple[ModelFamily, int, int], direction: str
) -> None:
    family, width, height = source
    margins = pan_margins(width, height, direction, family)
    added = {"left": margins.left, "right": margins.right, "up": margins.top}
    added["down"] = margins.bottom
    side = width if direction in {"left", "right"} else height
    step = family.size_step
    assert abs(added[direction] - side / 2) <= step / 2 and added[direction] % step == 0
    assert set(added.values()) == {0, added[direction]}


def test_a_flux_zoom_out_or_pan_canvas_fits_its_size_step_around_the_centred_source() -> None:
    # tiny FLUX's --ar 3:2 size: 1.5× of it in steps of 8 was 168×120, which FLUX rounds
    # down to 160×112, so the source pasted back no longer sat where the canvas had it.
    first, source = parent(112, 80, model="tiny-flux"), image_row(112, 80)
    assert family_of(first) is TINY_FLUX
    zoomed = outpaint_recipe(first, source, zoom_margins(112, 80, 1.5, TINY_FLUX))
    assert (zoomed.width, zoomed.height) == (160, 128)
    assert zoomed.outpaint == Outpaint(left=24, top=24, right=24, bottom=24, action="zoom 1.5")
    for direction in PAN_DIRECTIONS:
        panned = outpaint_recipe(first, source, pan_margins(112, 80, direction, TINY_FLUX))
        assert panned.width % 16 == 0 and panned.height % 16 == 0


def test_a_canvas_over_the_largest_side_is_refused_with_a_sentence() -> None:
    big = image_row(3072, 3072)
    with pytest.raises(ImagineError, match=r"6144×6144.*at most 4096 pixels a side"):
        outpaint_recipe(parent(), big, zoom_margins(3072, 3072, 2.0, TINY_SD))
    with pytest.raises(ImagineError, match="Pan goes left, right, up, down"):
        pan_margins(64, 64, "sideways", TINY_SD)


def test_outpaint_recipes_and_what_derives_from_them() -> None:
    source = image_row(64, 96)
    zoomed = outpaint_recipe(parent(64, 96), source, zoom_margins(64, 96, 1.5, TINY_SD), seed=5)
    assert (zoomed.width, zoomed.height, zoomed.count) == (96, 144, 4)
    assert zoomed.source_image_id == 11 and zoomed.aspect_ratio == "1:1"
    assert zoomed.outpaint is not None and zoomed.outpaint.action == "zoom 1.5"
    panned = outpaint_recipe(parent(64, 96), source, pan_margins(64, 96, "right", TINY_SD))
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
    recipe = outpaint_recipe(first, image_row(64, 64), zoom_margins(64, 64, 2.0, TINY_SD), seed=9)
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
