"""The engine on the tiny random-weight models: real diffusers code on the CPU."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generation.engine import (
    TEST_FAULT_ENV,
    CancelToken,
    Engine,
    GenerationCancelled,
    Progress,
)
from generation.grid import compose_grid
from generation.metadata import read_recipe
from generation.previews import latent_preview, wait_for_previews
from storage.derive import (
    STRONG_VARIATION_STRENGTH,
    SUBTLE_VARIATION_STRENGTH,
    UPSCALE_STRENGTH,
)
from storage.recipe import Recipe
from storage.settings import Settings

# Image i alone vs image i in a batch of four: batched matmuls may round differently,
# so allow at most 2/255 per channel (measured: 1).
BATCH_TOLERANCE = 2


def recipe(**changes: object) -> Recipe:
    values: dict[str, object] = {
        "model": "tiny",
        "prompt": "a red bicycle on a beach",
        "seed": 42,
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance": 5.0,
    }
    values.update(changes)
    return Recipe.model_validate(values)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def test_grid_is_one_batched_call_with_one_seed_per_image(
    tiny_engine: Engine, pipeline_calls: list[int]
) -> None:
    images = tiny_engine.txt2img(recipe())
    assert pipeline_calls == [4]
    assert [image.seed for image in images] == [42, 43, 44, 45]
    assert [image.index for image in images] == [0, 1, 2, 3]
    assert all(image.image.size == (64, 64) for image in images)


def test_image_i_regenerated_alone_matches_the_batch(tiny_engine: Engine) -> None:
    batch = tiny_engine.txt2img(recipe())
    for index in (0, 2):
        alone = tiny_engine.txt2img(recipe(seed=42 + index, count=1))[0]
        difference = np.abs(pixels(alone.image) - pixels(batch[index].image)).max()
        assert difference <= BATCH_TOLERANCE
    assert mean_difference(batch[0].image, batch[1].image) > 5  # the seeds do matter


def test_same_recipe_same_pixels_and_same_png_bytes(tiny_engine: Engine) -> None:
    first = tiny_engine.txt2img(recipe(count=2))
    second = tiny_engine.txt2img(recipe(count=2))
    assert [image.png for image in first] == [image.png for image in second]


def test_each_png_carries_its_own_recipe(tiny_engine: Engine) -> None:
    images = tiny_engine.txt2img(recipe(negative_prompt="blurry", sampler="euler_a"))
    embedded = read_recipe(images[3].png)
    assert embedded.seed == 45 and embedded.count == 1
    assert embedded.prompt == "a red bicycle on a beach"
    assert embedded.negative_prompt == "blurry"
    assert embedded.model_hash == tiny_engine.model_hash
    assert embedded.model_family == "tiny-sd"
    assert {"diffusers", "torch"} <= set(embedded.versions)
    with Image.open(io.BytesIO(images[3].png)) as png:
        parameters = png.info["parameters"]
    assert parameters.startswith("a red bicycle on a beach\nNegative prompt: blurry\n")
    assert "Seed: 45" in parameters and "Sampler: Euler a," in parameters
    assert f"Model hash: {tiny_engine.model_hash}" in parameters


def test_grid_image_is_two_by_two_and_carries_the_generation_recipe(tiny_engine: Engine) -> None:
    generation = recipe(width=96, height=64)
    images = tiny_engine.txt2img(generation)
    grid = compose_grid(images, generation)
    with Image.open(io.BytesIO(grid)) as image:
        assert image.size == (192, 128)
        assert np.array_equal(pixels(image.crop((96, 64, 192, 128))), pixels(images[3].image))
    assert read_recipe(grid) == generation


def test_samplers_change_the_result(tiny_engine: Engine) -> None:
    default = tiny_engine.txt2img(recipe(count=1))[0]
    ddim = tiny_engine.txt2img(recipe(count=1, sampler="ddim"))[0]
    assert mean_difference(default.image, ddim.image) > 0
    again = tiny_engine.txt2img(recipe(count=1))[0]
    assert np.array_equal(pixels(default.image), pixels(again.image))


def test_unknown_sampler_is_refused(tiny_engine: Engine) -> None:
    with pytest.raises(Exception, match="Unknown sampler 'warp'"):
        tiny_engine.txt2img(recipe(sampler="warp"))


def _final_latents(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Records the latents of each run's last step, before the VAE decodes them."""
    captured: list[torch.Tensor] = []
    original = engine._step_callback

    def recording(progress: object, cancel: object, **how: object) -> object:
        inner = original(progress, cancel, **how)  # type: ignore[arg-type]

        def on_step_end(pipe: object, step: int, t: object, tensors: dict) -> dict:
            if step + 1 == pipe.num_timesteps:  # type: ignore[attr-defined]
                captured.append(tensors["latents"].detach().clone())
            return inner(pipe, step, t, tensors)

        return on_step_end

    monkeypatch.setattr(engine, "_step_callback", recording)
    return captured


def test_subtle_variation_stays_closer_to_its_source_than_a_reroll(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A random-weight VAE is no autoencoder: every decode is ~42/255 from every other, so
    # distances are measured on the family's linear latent-to-RGB image of the latents (the
    # source's VAE encoding, each result's final latents): pixels a trained VAE approximates.
    latents = _final_latents(tiny_engine, monkeypatch)
    source = tiny_engine.txt2img(recipe(count=1, steps=8))[0].image
    vae = tiny_engine.pipe.vae
    with torch.no_grad():  # the source as img2img starts from it: its VAE encoding
        encoded = vae.encode(tiny_engine.pipe.image_processor.preprocess(source))
    source_latent = encoded.latent_dist.mean[0] * vae.config.scaling_factor
    source_pixels = pixels(latent_preview(source_latent, "sd15"))
    subtle = tiny_engine.img2img(
        recipe(seed=1000, steps=8, strength=SUBTLE_VARIATION_STRENGTH), source
    )
    subtle_latents = latents[-1]
    tiny_engine.img2img(recipe(seed=1000, steps=8, strength=STRONG_VARIATION_STRENGTH), source)
    strong_latents = latents[-1]
    tiny_engine.txt2img(recipe(seed=1000, steps=8))
    reroll_latents = latents[-1]

    def distance(batch: torch.Tensor) -> float:
        return float(
            np.mean(
                [
                    np.abs(pixels(latent_preview(latent, "sd15")) - source_pixels).mean()
                    for latent in batch
                ]
            )
        )

    assert len(subtle) == subtle_latents.shape[0] == 4
    subtle_distance = distance(subtle_latents)
    strong_distance = distance(strong_latents)
    reroll_distance = distance(reroll_latents)
    assert subtle_distance < strong_distance < reroll_distance
    assert subtle_distance < 0.5 * reroll_distance
    assert read_recipe(subtle[0].png).strength == SUBTLE_VARIATION_STRENGTH


def test_img2img_shares_the_weights_of_the_resident_pipeline(tiny_engine: Engine) -> None:
    assert tiny_engine.img2img_pipe.unet is tiny_engine.pipe.unet
    assert tiny_engine.img2img_pipe.vae is tiny_engine.pipe.vae
    assert tiny_engine.img2img_pipe.text_encoder is tiny_engine.pipe.text_encoder
    pointers = {p.data_ptr() for p in tiny_engine.pipe.unet.parameters()}
    assert pointers == {p.data_ptr() for p in tiny_engine.img2img_pipe.unet.parameters()}


@pytest.mark.parametrize("tile", [0, 48])
def test_upscale_is_exactly_twice_the_size(tiny_engine: Engine, tile: int) -> None:
    source = tiny_engine.txt2img(recipe(count=1, width=96, height=64))[0].image
    saved = tiny_engine.upscale_tile
    tiny_engine.upscale_tile = tile or saved
    try:
        upscaled = tiny_engine.upscale(recipe(width=96, height=64, scale=2), source)
    finally:
        tiny_engine.upscale_tile = saved
    assert upscaled.image.size == (192, 128)
    assert read_recipe(upscaled.png).width == 192
    assert read_recipe(upscaled.png).strength == UPSCALE_STRENGTH


def test_tiles_cover_the_image_with_overlap() -> None:
    from generation.engine import _tiles

    tiles = _tiles((192, 128), 48)
    covered = np.zeros((96, 160), dtype=int)
    for left, top, right, bottom in tiles:
        assert right - left == 48 and bottom - top == 48
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1 and covered.max() >= 2


def test_progress_reports_every_step_with_previews_every_k(tiny_engine: Engine) -> None:
    events: list[Progress] = []
    tiny_engine.txt2img(recipe(steps=6, count=2), progress=events.append)
    wait_for_previews()  # they come from their own thread, after their step's event
    steps = [(e.step, e.total) for e in events if e.preview is None]
    assert steps == [(i, 6) for i in range(1, 7)]
    shown = [(n, e.step, e.total) for n, e in enumerate(events) if e.preview is not None]
    assert [(step, total) for _, step, total in shown] == [(2, 6), (4, 6)]  # none on the last
    assert shown[0][0] > 1 and shown[1][0] > shown[0][0]
    preview = events[shown[0][0]].preview
    assert preview is not None
    with Image.open(io.BytesIO(preview)) as image:
        assert image.format == "JPEG" and max(image.size) <= 256


def test_cancel_stops_within_one_step(tiny_engine: Engine) -> None:
    token = CancelToken()
    seen: list[int] = []

    def on_progress(progress: Progress) -> None:
        seen.append(progress.step)
        if progress.step == 2:
            threading.Thread(target=token.cancel).start()
            threading.Event().wait(0.05)

    with pytest.raises(GenerationCancelled):
        tiny_engine.txt2img(recipe(steps=10), progress=on_progress, cancel=token)
    assert seen[-1] <= 3


def test_cancelled_before_start_never_runs(tiny_engine: Engine) -> None:
    token = CancelToken()
    token.cancel()
    seen: list[Progress] = []
    with pytest.raises(GenerationCancelled):
        tiny_engine.txt2img(recipe(), progress=seen.append, cancel=token)
    assert seen == []


def test_tiny_sdxl_runs_through_the_same_code(engine_settings: Settings) -> None:
    engine = Engine.from_settings(engine_settings, model="tiny-sdxl")
    assert engine.family.name == "tiny-sdxl"
    assert type(engine.pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(engine.img2img_pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
    images = engine.txt2img(recipe(model="tiny-sdxl"))
    assert len(images) == 4
    assert engine.img2img_pipe.unet is engine.pipe.unet
    assert Path(engine.loaded.source.path, "model_index.json").is_file()


def test_a_dedicated_upscaler_gives_exactly_twice_the_size(
    engine_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = engine_settings.model_copy(update={"upscaler": "tiny-upscaler"})
    engine = Engine.from_settings(settings)
    assert type(engine.upscaler).__name__ == "StableDiffusionUpscalePipeline"
    source = engine.txt2img(recipe(count=1, width=96, height=64))[0].image
    events: list[Progress] = []
    upscaled = engine.upscale(recipe(width=96, height=64, scale=2), source, progress=events.append)
    assert upscaled.image.size == (192, 128)  # the x4 stand-in's output fitted to 2x
    assert [e.step for e in events] == [1, 2, 3, 4] and events[-1].total == 4
    assert "Sampler: DDIM," in Image.open(io.BytesIO(upscaled.png)).info["parameters"]


def test_an_upscaler_setting_that_is_no_upscaler_is_refused(engine_settings: Settings) -> None:
    from storage.errors import ConfigError

    settings = engine_settings.model_copy(update={"upscaler": "tiny"})
    with pytest.raises(ConfigError, match="not an upscaling pipeline"):
        Engine.from_settings(settings)


def test_warm_up_runs_one_step_and_changes_no_result(tiny_engine: Engine) -> None:
    before = tiny_engine.txt2img(recipe(seed=77, steps=2))[0].png
    assert tiny_engine.warm_up() > 0
    assert tiny_engine.txt2img(recipe(seed=77, steps=2))[0].png == before


def test_a_batch_reports_to_each_recipe_and_stops_only_when_all_are_cancelled(
    tiny_engine: Engine,
) -> None:
    recipes = [recipe(count=1), recipe(prompt="a lighthouse at dusk", seed=7, count=2)]
    seen: list[list[Progress]] = [[], []]
    tokens = [CancelToken(), CancelToken()]

    def reporter(index: int) -> Callable[[Progress], None]:
        def report(progress: Progress) -> None:
            seen[index].append(progress)
            if index == 0 and progress.step == 1:
                tokens[1].cancel()  # the first recipe goes on alone

        return report

    kept, cancelled = tiny_engine.txt2img_batch(
        recipes, progress=[reporter(0), reporter(1)], cancel=tokens
    )
    # Within step 1 the first recipe's report cancelled the second before it heard of it.
    assert [p.step for p in seen[0] if p.preview is None] == [1, 2, 3, 4] and seen[1] == []
    assert len(kept) == 1 and cancelled == []  # a cancelled recipe gets no images
    assert {p.step for p in seen[0] if p.preview is not None} <= {2}  # every 2 steps

    steps: list[int] = []

    def cancel_all_at_two(progress: Progress) -> None:
        if progress.preview is not None:
            return  # a preview is an event of its own, after its step's
        steps.append(progress.step)
        if progress.step == 2:
            for token in tokens:
                token.cancel()

    tokens = [CancelToken(), CancelToken()]
    with pytest.raises(GenerationCancelled):
        tiny_engine.txt2img_batch(
            [recipe(steps=50), recipe(seed=3, steps=50)],
            progress=[cancel_all_at_two, None],
            cancel=tokens,
        )
    assert steps == [1, 2]


def test_a_batch_out_of_memory_runs_again_one_image_at_a_time_each_with_its_seed(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch, pipeline_calls: list[int]
) -> None:
    recipes = [recipe(prompt="a full harbour", seed=3, count=1), recipe(seed=7, count=2)]
    together = tiny_engine.txt2img_batch(recipes, encode=False)
    assert pipeline_calls == [3]
    pipeline_calls.clear()
    monkeypatch.setenv(TEST_FAULT_ENV, "oom:harbour")
    steps: list[list[int]] = [[], []]
    progress = [
        lambda p, j=j: steps[j].append(p.step * 100 // p.total) if p.preview is None else None
        for j in range(2)
    ]
    apart = tiny_engine.txt2img_batch(recipes, progress=progress, encode=False)
    assert pipeline_calls == [1, 1, 1]  # 3 ran out of memory (injected): one by one
    assert steps[0][-1] == 100 and steps[1][-1] == 100 and steps[1] == sorted(steps[1])
    assert [[one.seed for one in images] for images in apart] == [[3], [7, 8]]
    for images, expected in zip(apart, together, strict=True):
        for one, other in zip(images, expected, strict=True):
            assert np.abs(pixels(one.image) - pixels(other.image)).max() <= BATCH_TOLERANCE
