"""One list of samplers: the prompt language offers it, the engine runs it, the PNG names it
as AUTOMATIC1111 does (tiles and grid alike)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

from bot.prompt import PromptDefaults, PromptError, PromptOverrides, parse_prompt
from generation.engine import Engine, build_scheduler, listed_sampler
from generation.grid import compose_grid
from generation.metadata import read_recipe
from storage.families import FAMILIES
from storage.recipe import Recipe
from storage.samplers import (
    DEFAULT_SAMPLER,
    SAMPLER_NAMES,
    SAMPLERS,
    a1111_name,
    a1111_sampler,
    get_sampler,
)
from tests.test_engine import recipe as engine_recipe

TINY = PromptDefaults(model="tiny", family=FAMILIES["tiny-sd"])


def recipe(**changes: object) -> Recipe:
    """The engine tests' recipe, one image of two steps: every sampler runs quickly."""
    return engine_recipe(**{"steps": 2, "count": 1, **changes})


def parameters(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as image:
        text = image.info["parameters"]
    assert isinstance(text, str)
    return text


def test_the_prompt_language_offers_exactly_the_list() -> None:
    from bot.prompt import SAMPLERS as OFFERED

    assert OFFERED == SAMPLER_NAMES == (DEFAULT_SAMPLER, *(s.name for s in SAMPLERS))
    assert len(set(SAMPLER_NAMES)) == len(SAMPLER_NAMES)
    assert len({s.a1111 for s in SAMPLERS}) == len(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_listed_sampler_runs_and_is_named_as_a1111_names_it(
    tiny_engine: Engine, name: str
) -> None:
    (image,) = parse_prompt(f"a red bicycle --sampler {name} --steps 2 --seed 42", TINY)
    (made,) = tiny_engine.txt2img(image.model_copy(update={"count": 1, "width": 64}))
    assert made.image.size == (64, 96)
    assert np.asarray(made.image).std() > 0  # not a blank (NaN) image
    ran = tiny_engine.default_sampler if name == DEFAULT_SAMPLER else name
    assert read_recipe(made.png).sampler == ran
    expected = a1111_sampler(ran)
    assert expected is not None and f"Sampler: {expected}," in parameters(made.png)


def test_an_unknown_sampler_is_refused_before_queueing_naming_the_choices() -> None:
    for refuse in (
        lambda: parse_prompt("a cat --sampler warp", TINY),
        lambda: parse_prompt("a cat", TINY, overrides=PromptOverrides(sampler="warp")),
    ):
        with pytest.raises(PromptError) as refused:
            refuse()
        message = str(refused.value)
        assert message.startswith("--sampler warp is not allowed: one of default, euler")
        assert all(name in message for name in SAMPLER_NAMES) and message.endswith(".")


def test_default_is_stated_as_the_listed_sampler_that_builds_the_same_scheduler(
    tiny_engine: Engine,
) -> None:
    assert tiny_engine.default_sampler == "euler"  # the tiny model's own: EulerDiscrete
    (default,) = tiny_engine.txt2img(recipe())
    (euler,) = tiny_engine.txt2img(recipe(sampler="euler"))
    assert default.recipe.sampler == "euler"
    assert default.png == euler.png  # same pixels, same recipe, same bytes
    assert "Sampler: Euler," in parameters(default.png)


def test_tiles_and_grid_name_the_sampler_alike_for_any_reader(tiny_engine: Engine) -> None:
    generation = recipe(count=4, sampler="dpmpp_2m_karras")
    tiles = tiny_engine.txt2img(generation)
    grid = compose_grid(tiles, tiny_engine.complete_recipe(generation))
    for png in [tile.png for tile in tiles] + [grid]:
        assert "Sampler: DPM++ 2M Karras," in parameters(png)
    # The grid of a recipe without --sampler, as the worker stores it: completed.
    plain = tiny_engine.complete_recipe(recipe(count=4))
    assert "Sampler: Euler," in parameters(compose_grid(tiles, plain))
    assert "default" not in parameters(compose_grid(tiles, plain))

    sd_parsers = pytest.importorskip("sd_parsers")
    reader = sd_parsers.ParserManager()
    for png in (tiles[0].png, grid):
        info = reader.parse(io.BytesIO(png))
        assert info is not None and info.generator.name == "AUTOMATIC1111"
        (sampler,) = info.samplers
        assert sampler.name == "DPM++ 2M Karras"
        assert sampler.prompts[0].value == "a red bicycle on a beach"


def test_model_defaults_are_named_by_what_they_build() -> None:
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1)
    assert listed_sampler(euler) == "euler"
    karras = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    assert listed_sampler(karras) == "dpmpp_2m_karras"
    assert listed_sampler(DPMSolverMultistepScheduler()) == "dpmpp_2m"
    sde = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    assert listed_sampler(sde) == "dpm_sde"
    plms = PNDMScheduler(skip_prk_steps=True)  # Stable Diffusion 1.5's own
    assert listed_sampler(plms) == "plms"
    assert a1111_name("PNDMScheduler", plms.config) == "PLMS"
    # Off the list: the default keeps running as it is, under A1111's name where one fits.
    for scheduler, name in (
        (PNDMScheduler(), "PNDM"),
        (DDPMScheduler(), "DDPM"),
        (FlowMatchEulerDiscreteScheduler(), "Euler"),
    ):
        assert listed_sampler(scheduler) is None
        assert a1111_name(type(scheduler).__name__, scheduler.config) == name
    assert a1111_name("SomeNewScheduler", {}) == "SomeNewScheduler"


def test_a_listed_sampler_pins_what_its_name_promises() -> None:
    karras_default = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    plain = get_sampler("dpmpp_2m")
    assert plain is not None
    assert build_scheduler(plain, karras_default).config.use_karras_sigmas is False
    karras = get_sampler("dpmpp_2m_karras")
    assert karras is not None
    assert build_scheduler(karras, EulerDiscreteScheduler()).config.use_karras_sigmas is True


def test_a_model_default_off_the_list_is_named_on_the_grid_when_the_engine_says_so() -> None:
    from dataclasses import dataclass

    @dataclass
    class Tile:
        image: Image.Image

    tiles = [Tile(Image.new("RGB", (64, 64), (i * 40, 0, 0))) for i in range(4)]
    off_list = recipe(count=4)  # a completed recipe keeps "default" for such a model
    assert "Sampler: DDPM," in parameters(compose_grid(tiles, off_list, "DDPM"))
    assert "Sampler: DPM++ 2M," in parameters(compose_grid(tiles, recipe(sampler="dpmpp_2m")))
