"""SD3 and FLUX end to end on their tiny random-weight builds: the local CLI, the engine's
refusals and previews, and /imagine through the fake Discord."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bot.cli import main
from bot.prompt import PromptDefaults, PromptError, format_recipe, parse_prompt
from generation.engine import Engine
from generation.metadata import read_recipe
from generation.previews import unpack_latent
from generation.tiny import build_tiny_lora, ensure_tiny_model
from storage.checkpoints import UNET_CONV_IN, detect_checkpoint
from storage.errors import ConfigError, ImagineError
from storage.families import FAMILIES, get_family, guess_family
from storage.recipe import Recipe
from storage.settings import Settings
from tests.fake_discord import EPHEMERAL
from tests.test_bot import Harness, make_harness, png_size

NEW_MODELS = ["tiny-sd3", "tiny-flux"]
FAST = "--steps 2"  # enough to exercise every path; the tiny models need no more


@pytest.fixture(scope="module", params=NEW_MODELS)
def family_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Engine:
    data_dir = tmp_path_factory.mktemp(f"{request.param}-engine")
    settings = Settings(data_dir=data_dir, model=request.param, device="cpu", preview_every=1)
    return Engine.from_settings(settings)


# -- families as data ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("stabilityai/stable-diffusion-3.5-medium", "sd3"),
        ("stabilityai/stable-diffusion-3.5-large-turbo", "sd3-turbo"),
        ("black-forest-labs/FLUX.1-dev", "flux"),
        ("black-forest-labs/FLUX.1-schnell", "flux-schnell"),
        ("tiny-sd3", "tiny-sd3"),
        ("tiny-flux", "tiny-flux"),
    ],
)
def test_the_family_is_guessed_from_the_hub_id(model: str, family: str) -> None:
    assert guess_family(model).name == family


def test_the_family_is_read_from_a_folder_and_from_single_file_keys(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (folder / "transformer" / "config.json").write_text('{"guidance_embeds": false}')
    assert guess_family(str(folder)).name == "flux-schnell"
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    assert guess_family(str(folder)).name == "sd3"

    # Single files: one table (storage.checkpoints) reads the family from keys and widths.
    def family(shapes: dict[str, list[int]]) -> str:
        return detect_checkpoint(tmp_path / "model.safetensors", shapes).family

    flux = {
        "double_blocks.0.img_attn.qkv.weight": [9216, 3072],
        "guidance_in.in_layer.weight": [3072, 256],
        "img_in.weight": [3072, 64],
    }
    assert family(flux) == "flux"
    prefixed = {"model.diffusion_model." + key: shape for key, shape in flux.items()}
    assert family({k: v for k, v in prefixed.items() if "guidance" not in k}) == "flux-schnell"
    assert family({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": [6, 2]}) == (
        "sd3"
    )
    sdxl = {"conditioner.embedders.1.model.positional_embedding": [77, 1280]}
    assert family(sdxl | {UNET_CONV_IN: [320, 4, 3, 3]}) == "sdxl"
    sd15 = {"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": [77, 8]}
    assert family(sd15 | {UNET_CONV_IN: [320, 4, 3, 3]}) == "sd15"
    with pytest.raises(ConfigError, match=r"is not a Stable Diffusion 1\.x/2\.x, SDXL"):
        family({"encoder.down.0.weight": [1]})


def test_flux_refuses_a_negative_prompt_and_schnell_refuses_guidance() -> None:
    flux = PromptDefaults(model="black-forest-labs/FLUX.1-dev", family=get_family("flux"))
    with pytest.raises(PromptError, match="no negative prompt; describe what you want"):
        parse_prompt("a beach --no people", flux)
    schnell = PromptDefaults(model="x", family=get_family("flux-schnell"))
    with pytest.raises(PromptError, match="ignores --cfg"):
        parse_prompt("a beach --cfg 4", schnell)
    [recipe] = parse_prompt("a beach --seed 1", schnell)
    assert (recipe.steps, recipe.guidance) == (4, 0.0)
    assert parse_prompt(format_recipe(recipe), schnell) == [recipe]  # /info and Remix round-trip
    with pytest.raises(PromptError, match="flow matching"):
        parse_prompt("a beach --sampler euler_a", PromptDefaults("m", get_family("sd3")))


def test_a_prompt_surely_over_the_t5_limit_is_refused_before_queueing() -> None:
    defaults = PromptDefaults(model="tiny-flux", family=get_family("tiny-flux"))
    limit = FAMILIES["tiny-flux"].max_sequence_length
    assert limit is not None
    with pytest.raises(PromptError, match=f"reads at most {limit} T5 tokens"):
        parse_prompt(" ".join(["word"] * limit), defaults)


def test_flux_previews_unpack_like_the_pipeline() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(1, 16, 12, 8)
    packed = FluxPipeline._pack_latents(latents, 1, 16, 12, 8)
    # A 64x96 (width x height) image at VAE scale 8: 12x8 latents, 6x4 packed tokens.
    assert torch.equal(unpack_latent(packed[0], (64, 96), 8), latents[0])


# -- the engine ---------------------------------------------------------------------------


def _recipe(engine: Engine, **changes: object) -> Recipe:
    values: dict[str, object] = {
        "model": engine.model_id,
        "prompt": "a red bicycle",
        "seed": 5,
        "width": 96,
        "height": 64,
        "steps": 2,
        "guidance": engine.family.default_guidance,
        "count": 2,
    }
    return Recipe.model_validate(values | changes)


def test_grid_previews_and_per_tile_seeds(family_engine: Engine) -> None:
    previews: list[bytes] = []
    images = family_engine.txt2img(
        _recipe(family_engine),
        progress=lambda p: previews.append(p.preview) if p.preview else None,
    )
    assert [image.seed for image in images] == [5, 6]
    assert images[0].image.size == (96, 64)
    [preview] = previews  # step 1 of 2: the last step is the image itself
    with Image.open(io.BytesIO(preview)) as shown:
        assert shown.size == (256, 171)  # the latent's aspect, unpacked for FLUX
        assert np.asarray(shown).std() > 1  # not a flat colour
    alone = family_engine.txt2img(_recipe(family_engine, seed=6, count=1))[0]
    difference = np.abs(
        np.asarray(alone.image, dtype=np.int16) - np.asarray(images[1].image, dtype=np.int16)
    )
    assert difference.max() <= 2  # batched matmuls may round differently (test_engine)
    assert read_recipe(images[1].png).model_family == family_engine.family.name


def test_the_exact_t5_count_refuses_what_the_word_count_let_through(
    family_engine: Engine,
) -> None:
    # Nine words, but each long word is many tokens of the tiny character-level T5.
    prompt = " ".join(["extraordinarily"] * 9)
    with pytest.raises(ImagineError, match=r"T5 tokens long .* reads at most 32"):
        family_engine.txt2img(_recipe(family_engine, prompt=prompt))


def test_a_size_off_the_family_step_is_refused_with_a_sentence_before_the_pipeline(
    family_engine: Engine,
) -> None:
    label = family_engine.family.shown_name
    busy = family_engine.busy_seconds
    sentence = rf"^{label} makes images whose sides are multiples of 16 pixels, and 120×80 is not"
    off_step = _recipe(family_engine, width=120, height=80)
    with pytest.raises(ImagineError, match=sentence):
        family_engine.txt2img(off_step)
    with pytest.raises(ImagineError, match=sentence):
        family_engine.txt2img_batch([off_step, off_step.model_copy(update={"seed": 9})])
    source = Image.new("RGB", (120, 80), (90, 120, 200))
    with pytest.raises(ImagineError, match=sentence):
        family_engine.img2img(off_step.model_copy(update={"strength": 0.5}), source)
    assert family_engine.busy_seconds == busy  # no pipeline ran


def test_an_upscale_tile_side_is_rounded_down_to_the_size_step(family_engine: Engine) -> None:
    source = family_engine.txt2img(_recipe(family_engine, count=1))[0].image
    saved = family_engine.upscale_tile
    family_engine.upscale_tile = 40  # 40×40 tiles would be refused: 32×32 ones run
    try:
        upscaled = family_engine.upscale(_recipe(family_engine, scale=2, count=1), source)
    finally:
        family_engine.upscale_tile = saved
    assert upscaled.image.size == (192, 128)


@pytest.mark.parametrize("model", NEW_MODELS)
def test_a_compiled_worker_style_slots_take_a_transformer_lora(model: str, tmp_path: Path) -> None:
    from generation.lora import LoraSlots
    from generation.styles import StyleRegistry
    from generation.tiny import build_tiny_flux, build_tiny_sd3

    build = build_tiny_flux if model == "tiny-flux" else build_tiny_sd3
    build_tiny_lora(build().transformer, tmp_path / "l.safetensors", seed=3)
    (tmp_path / "s.toml").write_text(
        f'name = "s"\nlora = "l.safetensors"\nbase_model_family = "{model}"\n'
    )
    style = StyleRegistry.from_folder(tmp_path).get("s")
    slots = LoraSlots(build(), slots=1, rank=8, cache_size=2)
    slots.activate([(style, 1.0)])  # FLUX's single-stream blocks are slot targets too
    assert len(slots.resident) == 1


# -- the local CLI ------------------------------------------------------------------------


class LocalCli:
    def __init__(self, data_dir: Path, model: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.data_dir, self.model, self.capsys = data_dir, model, capsys

    def __call__(self, *args: str) -> list[str]:
        self.capsys.readouterr()
        code = main([*args, "--model", self.model])
        out, err = self.capsys.readouterr()
        assert code == 0, err
        return out.strip().splitlines()

    def ids(self, *args: str) -> tuple[list[int], Path]:
        lines = self(*args)
        line = next(line for line in lines if line.startswith("generation "))
        return [int(part) for part in line.split("image ids ")[1].split(", ")], Path(lines[-1])


@pytest.fixture(params=NEW_MODELS)
def cli(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[LocalCli]:
    model = request.param
    for name in [name for name in os.environ if name.startswith("IMAGINE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("IMAGINE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    # The tiny folder is built once per session and linked in: building is not under test.
    shared = Path(tempfile.gettempdir()) / f"imagine-test-{os.getuid()}"
    ensure_tiny_model(model, shared)
    models.mkdir()
    (models / model).symlink_to(shared / model)
    yield LocalCli(tmp_path, model, capsys)


def test_cli_grid_twice_variation_upscale_and_style(cli: LocalCli) -> None:
    from diffusers import AutoModel

    styles = cli.data_dir / "styles"
    styles.mkdir()
    transformer = AutoModel.from_pretrained(
        str(cli.data_dir / "models" / cli.model / "transformer")
    )
    build_tiny_lora(transformer, styles / "grain.safetensors", seed=3, scale=2.0)
    family = guess_family(cli.model).name
    (styles / "grain.toml").write_text(
        f'name = "grain"\nlora = "grain.safetensors"\ndescription = "grain"\n'
        f'base_model_family = "{family}"\n'
    )

    prompt = f"a red bicycle on a beach --ar 3:2 --seed 42 {FAST}"
    image_ids, grid = cli.ids("generate", prompt)
    again = cli.data_dir / "again.png"
    cli("generate", prompt, "--out", str(again))
    assert grid.read_bytes() == again.read_bytes()  # the same recipe, the same bytes
    recipe = read_recipe(grid.read_bytes())
    assert (recipe.width, recipe.height, recipe.model_family) == (112, 80, family)  # steps of 16
    assert png_size(grid.read_bytes()) == (224, 160)

    varied, varied_grid = cli.ids("vary", str(image_ids[1]), "--subtle")
    assert len(varied) == 4 and png_size(varied_grid.read_bytes()) == (224, 160)
    _, upscaled = cli.ids("upscale", str(image_ids[1]))
    assert png_size(upscaled.read_bytes()) == (224, 160)

    _, styled = cli.ids("generate", f"{prompt} --style grain", "--out", str(styles / "s.png"))
    plain = np.asarray(Image.open(grid), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(styled), dtype=np.int16) - plain).mean() > 0.5
    assert read_recipe(styled.read_bytes()).styles[0].name == "grain"


# -- /imagine through the fake Discord ----------------------------------------------------


@pytest.fixture
async def discord(
    tmp_path: Path, family_engine: Engine, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    async with make_harness(tmp_path, family_engine, request) as harness:
        await harness.start_worker()
        await harness.start_bot()
        yield harness


async def test_imagine_refuses_before_any_row_then_u2_and_vary_subtle(discord: Harness) -> None:
    family = discord.services.family
    words = " ".join(["sea"] * (family.max_sequence_length or 0))
    refusals = {f"a boat {words}": "T5 tokens (a word is a token or more)"}
    if not family.negative_prompt:
        refusals["a boat --no people"] = "no negative prompt; describe what you want instead"
    for prompt, sentence in refusals.items():
        interaction = await discord.imagine(prompt)
        await discord.fake.wait_for(lambda i=interaction: i.responses, what="a response")
        [response] = interaction.responses
        assert response["data"]["flags"] & EPHEMERAL
        assert sentence in response["data"]["content"]
    assert await discord.generations() == []

    fake = discord.fake
    grid = await discord.result(await discord.imagine(f"a boat {FAST} --seed 11"))
    grid_id = int(grid["id"])
    [grid_png] = fake.attachment_bytes(grid_id)
    assert png_size(grid_png) == (192, 192)
    single = await discord.result(await fake.click(grid_id, fake.button(grid_id, "U2")))
    [tile] = fake.attachment_bytes(int(single["id"]))
    assert read_recipe(tile).seed == 12
    subtle = await discord.result(await discord.press(single, "Vary (Subtle)"))
    assert png_size(fake.attachment_bytes(int(subtle["id"]))[0]) == (192, 192)
    first, variation = await discord.generations()
    assert variation.parent_image_id == sorted(first.images, key=lambda i: i.index)[1].id


async def test_a_zoom_out_of_an_ar_3_2_image_fits_the_size_step_and_keeps_its_pixels(
    discord: Harness,
) -> None:
    fake = discord.fake
    grid = await discord.result(await discord.imagine(f"a harbour --ar 3:2 {FAST} --seed 4"))
    single = await discord.result(await discord.press(grid, "U1"))
    [tile] = fake.attachment_bytes(int(single["id"]))
    assert png_size(tile) == (112, 80)  # 3:2 in steps of 16 (steps of 8 made 120×80)
    zoomed = await discord.result(await discord.press(single, "🔭Zoom Out 1.5×"))
    [zoomed_grid] = fake.attachment_bytes(int(zoomed["id"]))
    assert png_size(zoomed_grid) == (320, 256)  # four 160×128 canvases
    _, zoom_row = await discord.generations()
    margins = zoom_row.recipe.outpaint
    assert margins is not None and (margins.left, margins.top) == (24, 24)  # centred
    [image] = [i for i in zoom_row.images if i.index == 0]
    pixels = np.asarray(Image.open(io.BytesIO(await discord.services.blobs.get(image.blob_key))))
    source = np.asarray(Image.open(io.BytesIO(tile)).convert("RGB"))
    assert np.array_equal(pixels[24 : 24 + 80, 24 : 24 + 112, :3], source)
