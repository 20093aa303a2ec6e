"""Image prompts: the prompt language (a leading Discord link, --iw), the recipe fields that
keep the image, the strength --iw maps to, the engine path, and /imagine with an image
through the fake Discord."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.prompt import (
    PromptDefaults,
    PromptError,
    PromptOverrides,
    format_recipe,
    parse_prompt,
    take_image_url,
)
from generation.engine import Engine
from generation.jobs import image_prompt_source
from generation.metadata import a1111_parameters, read_recipe
from generation.previews import latent_preview
from storage.backup import postgres_facts, sqlite_facts
from storage.controls import ControlRef
from storage.database import Database
from storage.derive import (
    image_prompt_size,
    image_prompt_strength,
    remix_base,
    reroll_recipe,
    upscale_recipe,
    variation_recipe,
)
from storage.families import FAMILIES
from storage.generations import create_generation
from storage.intake import IntakeLimits, intake_image
from storage.models import GenerationKind
from storage.models import Image as ImageRow
from storage.recipe import ImageRef, Recipe
from tests.fake_discord import EPHEMERAL
from tests.test_bot import Harness, make_harness
from tests.test_engine import _final_latents, pixels
from tests.test_intake import png_header_only

SD15 = PromptDefaults(model="sd", family=FAMILIES["sd15"])
CDN = "https://cdn.discordapp.com"
REF = ImageRef(blob_key="a" * 64, sha256="a" * 64, width=300, height=150)


def on_cdn(url: str) -> bool:
    return url.startswith(CDN + "/")


def parse(text: str, **kwargs: object) -> list[Recipe]:
    return parse_prompt(text, SD15, random_seed=lambda: 7, **kwargs)  # type: ignore[arg-type]


def photo(width: int = 150, height: int = 100) -> bytes:
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image.paste((220, 40, 40), (0, 0, width // 3, height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- the prompt language ----------------------------------------------------------------------


def test_a_leading_discord_link_is_taken_and_any_other_is_refused() -> None:
    url = f"{CDN}/attachments/1/2/cat.png?ex=1&hm=2"
    assert take_image_url(f"{url} a cat --iw 2", on_cdn) == (url, "a cat --iw 2")
    assert take_image_url(f"<{url}>   a cat", on_cdn) == (url, "a cat")
    assert take_image_url(f"a cat {url}", on_cdn) == (None, f"a cat {url}")  # only at the start
    for text in (
        "https://example.com/cat.png a cat",
        "http://cdn.discordapp.com/attachments/1/cat.png a cat",  # https only
        "file:///etc/passwd a cat",
        "https://cdn.discordapp.com@evil.example/x.png a cat",
    ):
        with pytest.raises(PromptError, match="only fetches images from Discord"):
            take_image_url(text, on_cdn, "Discord")
    with pytest.raises(PromptError, match="one image prompt"):
        take_image_url(f"{url} {url} a cat", on_cdn)


def test_iw_maps_to_the_strength_in_one_place() -> None:
    assert [image_prompt_strength(w) for w in (0, 0.5, 1, 1.5, 2)] == [1.0, 0.8, 0.6, 0.4, 0.2]
    [default] = parse("a cat", image=REF)
    assert default.image_weight == 1.0 and default.strength == image_prompt_strength(1.0)
    [heavy] = parse("a cat --iw 1.75", image=REF)
    assert heavy.strength == image_prompt_strength(1.75) < default.strength
    with pytest.raises(PromptError, match=r"--iw 2\.5 is not allowed: a number from 0 to 2"):
        parse("a cat --iw 2.5", image=REF)
    with pytest.raises(PromptError, match="--iw weighs an image prompt, and there is none"):
        parse("a cat --iw 1")
    [checked] = parse("a cat --iw 1", image_expected=True)  # fetched later: no image yet
    assert checked.init_image is None and checked.strength is None


def test_the_size_follows_the_image_unless_ar_is_given() -> None:
    [follows] = parse("a cat", image=REF)
    assert follows.aspect_ratio is None
    assert (follows.width, follows.height) == image_prompt_size(REF, FAMILIES["sd15"])
    assert abs(follows.width / follows.height - 2) < 0.05  # multiples of 8, near 2:1
    [square] = parse("a cat --ar 1:1", image=REF)
    assert (square.width, square.height) == (512, 512)
    sliver = REF.model_copy(update={"width": 1000, "height": 10})
    [wide] = parse("a cat", image=sliver)
    assert abs(wide.width / wide.height - 4) < 0.1  # limited to 4:1, as --ar is


def test_a_default_aspect_ratio_does_not_crop_an_image_prompt() -> None:
    """The picture takes the image's shape unless --ar is given: a member's /settings ratio
    is not given in the prompt. Typed there, or as the command's option, it still crops."""
    wide = PromptOverrides(aspect_ratio="16:9")
    tall = REF.model_copy(update={"width": 1152, "height": 2048})
    [follows] = parse("a cat", image=tall, fallbacks=wide)
    assert follows.aspect_ratio is None
    assert (follows.width, follows.height) == image_prompt_size(tall, FAMILIES["sd15"])
    assert parse("a cat", image_expected=True, fallbacks=wide)[0].aspect_ratio is None
    [typed] = parse("a cat --ar 1:1", image=tall, fallbacks=wide)
    square = PromptOverrides(aspect_ratio="1:1")
    [option] = parse("a cat", image=tall, fallbacks=wide, overrides=square)
    assert typed.aspect_ratio == option.aspect_ratio == "1:1"
    [text_only] = parse("a cat", fallbacks=wide)
    assert text_only.aspect_ratio == "16:9"
    # An image that only gives a control's structure sets no shape: the default applies.
    [structure] = parse("a cat --control canny", image=tall, fallbacks=wide)
    assert structure.init_image is None and structure.aspect_ratio == "16:9"


def test_a_recipe_keeps_its_image_through_text_derivations_and_png_metadata() -> None:
    [recipe] = parse("a cat --seed 3 --iw 0.5", image=REF)
    text = format_recipe(recipe)
    assert "--iw 0.5" in text and parse(text, image=REF) == [recipe]
    parameters = a1111_parameters(recipe)
    assert "Denoising strength: 0.8" in parameters
    assert f"Init image hash: {REF.sha256[:12]}" in parameters and "Image weight: 0.5" in parameters
    tile = ImageRow(id=9, seed=4, width=recipe.width, height=recipe.height)
    for derived in (
        reroll_recipe(recipe),
        remix_base(recipe),
        variation_recipe(recipe, tile, strong=True),
        upscale_recipe(recipe, tile),
    ):
        assert derived.init_image == REF and derived.image_weight == 0.5
    assert remix_base(variation_recipe(recipe, tile, strong=True)).strength == 0.8
    with pytest.raises(ValueError, match="needs both init_image and image_weight"):
        Recipe.model_validate({**recipe.model_dump(), "image_weight": None})


flag_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
    st.sampled_from(["0", "2", "1.5", "-1", "2.0001", ""]),
)
links = st.sampled_from(
    [
        "",
        f"{CDN}/attachments/1/2/a.png ",
        f"<{CDN}/a.webp> ",
        "https://example.com/a.png ",
        "http://localhost:8080/ ",
        f"{CDN}/a.png {CDN}/b.png ",
        "https:// ",
    ]
)
image_texts = st.builds(
    lambda link, prompt, flags: link + prompt + "".join(f" --iw {value}" for value in flags),
    links,
    st.text(max_size=30),
    st.lists(flag_values, max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(image_texts, st.text(max_size=60)))
def test_any_text_with_links_and_iw_parses_or_gives_a_sentence(text: str) -> None:
    try:
        url, rest = take_image_url(text, on_cdn)
        recipes = parse(rest, image=REF if url is not None else None)
    except PromptError as error:
        assert str(error).endswith((".", "?"))
        return
    for recipe in recipes:
        if url is None:
            assert recipe.init_image is None
        else:
            assert url.startswith(CDN) and recipe.init_image == REF
            assert recipe.image_weight is not None
            assert recipe.strength == image_prompt_strength(recipe.image_weight)


# -- the engine ---------------------------------------------------------------------------------


def test_raising_iw_moves_the_result_closer_to_the_image(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = intake_image(photo(96, 96), IntakeLimits(2**20, 10**6))
    source = Image.open(io.BytesIO(kept.png)).convert("RGB")
    vae = tiny_engine.pipe.vae
    with torch.no_grad():  # distances in latent space, as the variation test measures them
        encoded = vae.encode(tiny_engine.pipe.image_processor.preprocess(source))
    target = pixels(
        latent_preview(
            encoded.latent_dist.mean[0] * vae.config.scaling_factor,
            tiny_engine.family.latent_format,
        )
    )
    latents = _final_latents(tiny_engine, monkeypatch)
    ref = ImageRef(blob_key=kept.sha256, sha256=kept.sha256, width=96, height=96)
    defaults = PromptDefaults(model="tiny", family=FAMILIES["tiny-sd"], count=2)
    distances = []
    for weight in (0.25, 1.75):
        [recipe] = parse_prompt(f"a harbour --seed 3 --steps 6 --iw {weight}", defaults, image=ref)
        tiny_engine.img2img(recipe, source)
        distances.append(
            np.mean(
                [
                    np.abs(
                        pixels(latent_preview(latent, tiny_engine.family.latent_format)) - target
                    ).mean()
                    for latent in latents[-1]
                ]
            )
        )
    assert distances[1] < 0.7 * distances[0], distances


# -- through Discord ----------------------------------------------------------------------------


@pytest.fixture
async def running(
    tmp_path: Path, tiny_engine: Engine, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    async with make_harness(tmp_path, tiny_engine, request) as harness:
        await harness.start_worker()
        await harness.start_bot()
        yield harness


async def test_imagine_with_an_image_reproduces_and_its_buttons_keep_the_image(
    running: Harness, tiny_engine: Engine
) -> None:
    fake, blobs = running.fake, running.services.blobs
    value, resolved = fake.attachment_option("photo.png", photo(150, 100))
    interaction = await fake.slash(
        "imagine",
        options={"prompt": "a harbour --steps 2 --seed 5 --iw 1.5", "image": value},
        resolved=resolved,
    )
    grid = await running.result(interaction)
    [generation] = await running.generations()
    recipe = generation.recipe
    ref = recipe.init_image
    assert ref is not None and (ref.width, ref.height) == (150, 100)
    stored = await blobs.get(ref.blob_key)
    assert hashlib.sha256(stored).hexdigest() == ref.sha256 == ref.blob_key
    assert recipe.image_weight == 1.5 and recipe.strength == image_prompt_strength(1.5)
    assert recipe.aspect_ratio is None and recipe.width * 2 == recipe.height * 3  # 3:2, as sent
    [posted] = fake.attachment_bytes(int(grid["id"]))
    assert read_recipe(posted).init_image == ref

    shown = await running.result(await fake.slash("show", options={"generation": generation.id}))
    assert fake.attachment_bytes(int(shown["id"])) == [posted]
    # The stored recipe alone makes the same PNGs again, bit for bit.
    source = await image_prompt_source(blobs, recipe)
    again = await asyncio.to_thread(tiny_engine.img2img, recipe, source)
    for image in generation.images:
        assert again[image.index].png == await blobs.get(image.blob_key)

    await running.result(await running.press(grid, "V1"))
    await running.result(await running.press(grid, "🔄"))
    modal_id, text = await running.open_remix(grid)
    assert "--iw 1.5" in text
    remixed = await fake.submit_modal(modal_id, {"prompt": text.replace("a harbour", "a port")})
    await running.result(remixed)
    _, variation, reroll, remix = await running.generations()
    for derived in (variation, reroll, remix):
        assert derived.recipe.init_image == ref and derived.recipe.image_weight == 1.5
    assert remix.recipe.prompt == "a port" and remix.recipe.strength == 0.4

    single = await running.result(await running.press(grid, "U2"))
    info = await running.press(single, "Info")
    await fake.wait_for(lambda: info.responses, what="the info")
    assert f"sha256 `{ref.sha256[:16]}" in info.responses[0]["data"]["content"]


async def test_a_discord_link_at_the_start_of_the_prompt_is_an_image_prompt(
    running: Harness,
) -> None:
    url = running.fake.upload("earlier.png", photo(100, 150))
    await running.result(await running.imagine(f"{url} a harbour --steps 2 --ar 1:1"))
    [generation] = await running.generations()
    assert generation.recipe.prompt == "a harbour"
    assert generation.recipe.init_image is not None
    assert (generation.recipe.width, generation.recipe.height) == (96, 96)  # --ar wins


async def test_a_default_aspect_ratio_leaves_an_attached_image_its_shape(
    running: Harness,
) -> None:
    fake = running.fake
    settings = await fake.slash("settings", subcommand="set", options={"aspect_ratio": "16:9"})
    await fake.wait_for(lambda: settings.responses, what="the settings' answer")
    value, resolved = fake.attachment_option("photo.png", photo(100, 150))
    options = {"prompt": "a harbour --steps 2", "image": value}
    await running.result(await fake.slash("imagine", options=options, resolved=resolved))
    [generation] = await running.generations()
    recipe = generation.recipe
    assert recipe.aspect_ratio is None and recipe.width * 3 == recipe.height * 2  # 2:3, as sent


async def test_bad_images_are_refused_with_a_sentence_before_anything_is_queued(
    running: Harness,
) -> None:
    fake = running.fake
    cap = running.services.settings.image_max_mb * 2**20
    whole = photo()
    attachments = {
        "notes.png": (b"just some text\n" * 10, None, "could not be read"),
        "huge.png": (png_header_only(20_000, 10_000), None, "megapixels|too many pixels"),
        "logo.png": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', None, "could not be read"),
        "page.png": (b"<html><body>hi</body></html>", None, "could not be read"),
        "cut.png": (whole[: len(whole) // 2], None, "could not be read"),
        "big.png": (whole, cap + 1, "Send a smaller file"),
    }
    for filename, (data, size, expected) in attachments.items():
        value, resolved = fake.attachment_option(filename, data, size=size)
        interaction = await fake.slash(
            "imagine", options={"prompt": "a cat --steps 2", "image": value}, resolved=resolved
        )
        said = await fake.wait_for(lambda i=interaction: fake.said_privately(i), what=filename)
        assert re.search(expected, said), (filename, said)
        assert said.endswith("."), said
    big_id = int(next(iter(resolved["attachments"])))
    assert big_id not in fake.downloads  # refused from its declared size, never fetched
    for prompt in (
        "https://example.com/cat.png a cat",
        f"{fake.upload('a.png', whole).replace('http://', 'https://')} a cat",
    ):
        interaction = await running.imagine(prompt)
        said = await fake.wait_for(lambda i=interaction: fake.said_privately(i), what=prompt)
        assert "only fetches images from" in said
        assert interaction.responses[0]["data"]["flags"] & EPHEMERAL
    assert await running.generations() == []


async def test_a_backup_keeps_every_image_a_recipe_names(database: Database) -> None:
    """An image prompt's image, and a control's uploaded image and map."""
    source, made = hashlib.sha256(b"a photo").hexdigest(), hashlib.sha256(b"its map").hexdigest()
    [recipe] = parse("a cat --seed 3", image=REF)
    control = ControlRef(type="depth", source_key=source, map_key=made)
    recipe = recipe.model_copy(update={"controls": (control,)})
    async with database.session() as session:
        await create_generation(session, kind=GenerationKind.IMAGINE, recipe=recipe, requester_id=1)
    if database.url.get_backend_name() == "sqlite":
        assert database.url.database is not None
        facts = await asyncio.to_thread(sqlite_facts, Path(database.url.database))
    else:
        facts = await postgres_facts(database.url)
    assert {REF.blob_key, source, made} <= facts.blob_keys


def test_imagine_show_names_the_image_prompt(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import main
    from bot.deployment import start_deployment
    from storage.settings import load_settings

    [recipe] = parse("a cat --seed 3 --iw 2", image=REF)

    async def made() -> int:
        deployment = await start_deployment(load_settings())
        try:
            async with deployment.database.session() as session:
                generation = await create_generation(
                    session, kind=GenerationKind.IMAGINE, recipe=recipe, requester_id=1
                )
                return generation.id
        finally:
            await deployment.close()

    generation_id = asyncio.run(made())
    assert main(["show", str(generation_id)]) == 0
    shown = capsys.readouterr().out
    assert f"image prompt: blob {REF.blob_key} (300x150" in shown
    assert "--iw 2, strength 0.2" in shown and "--iw 2.0" in shown
