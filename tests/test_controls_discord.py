"""``--control`` through Discord: the ``control`` attachment, the flags, the refusals before
anything is queued, and recipes that keep their controls through every button."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.prompt import PromptDefaults, PromptError, format_recipe, parse_prompt
from generation.controlnet import ControlNets
from generation.controls import ControlRegistry
from generation.engine import Engine
from generation.jobs import control_maps
from generation.tiny import write_tiny_controls
from storage.controls import CONTROL_TYPES
from storage.families import FAMILIES
from tests.test_bot import Harness, make_harness

TINY = PromptDefaults(model="tiny", family=FAMILIES["tiny-sd"])
SOURCE = "b" * 64


def photo(width: int = 96, height: int = 96) -> bytes:
    image = Image.new("RGB", (width, height), (30, 30, 30))
    image.paste((230, 230, 230), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- the prompt language ----------------------------------------------------------------------


def test_control_flags_one_value_for_all_or_one_per_control_and_back_as_text() -> None:
    [recipe] = parse_prompt(
        "a hut --control canny,depth:raw --cw 0.5,1.5 --cend 0.8",
        TINY,
        control_source=SOURCE,
    )
    canny, depth = recipe.controls
    assert (canny.type, canny.weight, canny.end, canny.raw) == ("canny", 0.5, 0.8, False)
    assert (depth.type, depth.weight, depth.end, depth.raw) == ("depth", 1.5, 0.8, True)
    assert canny.source_key == depth.source_key == SOURCE and canny.map_key is None
    [again] = parse_prompt(format_recipe(recipe), TINY, control_source=SOURCE)
    assert again == recipe


@pytest.mark.parametrize(
    ("text", "source", "expected"),
    [
        ("a hut --cw 0.5", None, "--cw tunes a control, and there is none"),
        ("a hut --control canny", None, "takes the structure from an image, and there is none"),
        ("a hut --steps 2", SOURCE, "A control image says nothing by itself"),
        ("a hut --control blur", SOURCE, "--control blur is not allowed"),
        ("a hut --control canny,depth,pose", SOURCE, "is not allowed: one or 2 of"),
        ("a hut --control canny --cw 1,2", SOURCE, "--cw has 2 values for 1 controls"),
        ("a hut --control canny --cstart 0.9 --cend 0.2", SOURCE, "must be below --cend"),
        ("a hut --control canny --cw 3", SOURCE, "a number from 0 to 2"),
    ],
)
def test_bad_control_flags_get_a_sentence(text: str, source: str | None, expected: str) -> None:
    with pytest.raises(PromptError, match=expected) as refused:
        parse_prompt(text, TINY, control_source=source)
    assert str(refused.value).endswith(".")


control_texts = st.builds(
    lambda prompt, flags: prompt + "".join(f" --{name} {value}" for name, value in flags),
    st.text(max_size=20),
    st.lists(
        st.tuples(
            st.sampled_from(["control", "cw", "cstart", "cend"]),
            st.one_of(
                st.sampled_from([*CONTROL_TYPES, "canny,depth", "pose:raw", "0.5", "1,2"]),
                st.text(max_size=8),
            ),
        ),
        max_size=4,
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(control_texts, st.booleans())
def test_any_text_with_control_flags_parses_or_gives_a_sentence(text: str, image: bool) -> None:
    try:
        recipes = parse_prompt(text, TINY, control_source=SOURCE if image else None)
    except PromptError as error:
        assert str(error).endswith((".", "?"))
        return
    for recipe in recipes:
        assert len(recipe.controls) <= 2
        assert all(control.source_key == SOURCE for control in recipe.controls)


# -- through Discord ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controls_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_controls(tmp_path_factory.mktemp("controls"), "tiny-sd", ("canny", "depth"))


@pytest.fixture
def controlled_engine(tiny_engine: Engine, controls_folder: Path) -> Iterator[Engine]:
    saved = tiny_engine.controls
    registry = ControlRegistry.from_folder(controls_folder)
    assert not registry.problems, registry.problems
    settings = tiny_engine.controls.settings if saved is not None else None
    assert settings is not None
    tiny_engine.controls = ControlNets(
        registry, settings, tiny_engine.family.name, tiny_engine.device, tiny_engine.loaded.dtype
    )
    try:
        yield tiny_engine
    finally:
        tiny_engine.controls = saved


@pytest.fixture
async def running(
    tmp_path: Path,
    controlled_engine: Engine,
    controls_folder: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Harness]:
    async with make_harness(tmp_path, controlled_engine, request) as harness:
        harness.services.controls = ControlRegistry.from_folder(controls_folder)
        await harness.start_worker()
        await harness.start_bot()
        yield harness


async def test_a_control_image_steers_and_every_button_keeps_the_control(
    running: Harness, controlled_engine: Engine
) -> None:
    fake, blobs = running.fake, running.services.blobs
    value, resolved = fake.attachment_option("shape.png", photo())
    interaction = await fake.slash(
        "imagine",
        options={
            "prompt": "a harbour --steps 2 --seed 5 --control canny --cw 0.8",
            "control": value,
        },
        resolved=resolved,
    )
    grid = await running.result(interaction)
    [generation] = await running.generations()
    [control] = generation.recipe.controls
    assert (control.type, control.weight) == ("canny", 0.8)
    assert control.source_key is not None and await blobs.get(control.source_key)
    assert control.map_key is not None and control.preprocessor is not None
    assert control.preprocessor.startswith("opencv")
    assert generation.recipe.init_image is None  # the control image is no image prompt
    [posted] = fake.attachment_bytes(int(grid["id"]))
    with Image.open(io.BytesIO(posted)) as png:
        assert 'ControlNet 0: "Module: canny' in png.info["parameters"]

    # The stored recipe (its stored map) makes the same PNGs again, bit for bit.
    recipe, maps = await control_maps(blobs, controlled_engine, generation.recipe)
    again = await asyncio.to_thread(controlled_engine.txt2img, recipe, maps=maps)
    for image in generation.images:
        assert again[image.index].png == await blobs.get(image.blob_key)

    await running.result(await running.press(grid, "V1"))
    await running.result(await running.press(grid, "🔄"))
    modal_id, text = await running.open_remix(grid)
    assert "--control canny --cw 0.8" in text
    remixed = await fake.submit_modal(modal_id, {"prompt": text.replace("a harbour", "a port")})
    await running.result(remixed)
    _, variation, reroll, remix = await running.generations()
    for derived in (variation, reroll, remix):
        [kept] = derived.recipe.controls
        assert (kept.type, kept.weight, kept.source_key) == ("canny", 0.8, control.source_key)
    # A remix whose text no longer asks for the control drops it (it was refused).
    modal_id, text = await running.open_remix(grid)
    plain = text.replace(" --control canny --cw 0.8", "")
    await running.result(await fake.submit_modal(modal_id, {"prompt": plain}))
    *_, uncontrolled = await running.generations()
    assert uncontrolled.recipe.controls == () and uncontrolled.recipe.prompt == "a harbour"

    single = await running.result(await running.press(grid, "U2"))
    info = await running.press(single, "Info")
    await fake.wait_for(lambda: info.responses, what="the info")
    assert "Control 1: canny, weight 0.8" in info.responses[0]["data"]["content"]


async def test_controls_are_refused_with_a_sentence_before_anything_is_queued(
    running: Harness,
) -> None:
    fake = running.fake
    cases = {
        "a cat --control pose": "There is no pose control for tiny-sd models; "
        "controls for tiny-sd models here: canny, depth.",
        "a cat --steps 2": "A control image says nothing by itself",
    }
    for prompt, expected in cases.items():
        value, resolved = fake.attachment_option("shape.png", photo())
        interaction = await fake.slash(
            "imagine", options={"prompt": prompt, "control": value}, resolved=resolved
        )
        said = await fake.wait_for(lambda i=interaction: fake.said_privately(i), what=prompt)
        assert expected in said, said
    for prompt in ("a cat --control canny", "a cat --cw 0.5"):
        interaction = await running.imagine(prompt)
        said = await fake.wait_for(lambda i=interaction: fake.said_privately(i), what=prompt)
        assert said.endswith("."), said
    assert await running.generations() == []


async def test_the_image_prompt_alone_gives_the_structure_without_iw(running: Harness) -> None:
    fake = running.fake
    value, resolved = fake.attachment_option("shape.png", photo())
    interaction = await fake.slash(
        "imagine",
        options={"prompt": "a hut --steps 2 --control depth", "image": value},
        resolved=resolved,
    )
    await running.result(interaction)
    [generation] = await running.generations()
    [control] = generation.recipe.controls
    assert control.type == "depth" and control.source_key is not None
    assert generation.recipe.init_image is None and generation.recipe.strength is None
