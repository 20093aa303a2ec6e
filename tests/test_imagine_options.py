"""/imagine's typed options reach the recipe as values, through the fake Discord."""

from __future__ import annotations

import io

from PIL import Image

from generation.metadata import read_recipe
from tests.fake_discord import EPHEMERAL
from tests.test_bot import Harness, harness, running

__all__ = ["harness", "running"]


async def refusal(running: Harness, **options: object) -> str:
    prompt = str(options.pop("prompt"))
    interaction = await running.imagine(prompt, **options)
    await running.fake.wait_for(lambda: interaction.responses, what="a response")
    [response] = interaction.responses
    assert response["type"] == 4 and response["data"]["flags"] & EPHEMERAL
    content: str = response["data"]["content"]
    return content


async def test_the_seed_and_shape_options_win_over_the_flags_in_the_text(
    running: Harness,
) -> None:
    message = await running.result(
        await running.imagine(
            "a lighthouse --seed 1 --ar 1:1 --steps 2", seed=7, aspect_ratio="3:2"
        )
    )
    [generation] = await running.generations()
    assert (generation.recipe.seed, generation.recipe.aspect_ratio) == (7, "3:2")
    assert generation.recipe.prompt == "a lighthouse"
    [grid] = running.fake.attachment_bytes(int(message["id"]))
    assert read_recipe(grid).seed == 7
    with Image.open(io.BytesIO(grid)) as image:
        parameters = image.info["parameters"]
    # No --sampler: the grid states the sampler that ran, as A1111 names it.
    assert "Sampler: Euler," in parameters and "Seed: 7," in parameters


async def test_a_negative_option_is_never_read_as_flags(running: Harness) -> None:
    content = await refusal(running, prompt="a cat --steps 2", negative="dogs --seed 3")
    assert content.startswith("--no dogs --seed 3 is not allowed:")
    assert await running.generations() == []


async def test_an_unknown_sampler_is_refused_before_queueing(running: Harness) -> None:
    content = await refusal(running, prompt="a cat --sampler warp")
    assert "--sampler warp is not allowed: one of default, euler, euler_a" in content
    assert await running.generations() == []
