"""ControlNet: preprocessors, the controls registry, and controlled generations on tiny models.

Real diffusers ControlNet pipelines (``from_pipe`` of the resident one) over random-weight
ControlNets built from the tiny UNets, loaded back through ``from_pretrained``.
"""

from __future__ import annotations

import io
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pydantic import ValidationError

from generation.controlnet import ControlNets
from generation.controls import ControlRegistry, parse_control
from generation.engine import TEST_FAULT_ENV, Engine, Progress
from generation.jobs import control_maps, image_prompt_source, run_generation
from generation.metadata import read_recipe
from generation.preprocess import Canny, Lineart, Scribble, Unchanged, draw_openpose
from generation.tiny import build_tiny_lora, build_tiny_sd, write_tiny_controls
from storage.blobs import LocalBlobStore, blob_key
from storage.controls import ControlError, ControlRef, check_controls, make_control
from storage.database import Database
from storage.families import FAMILIES
from storage.generations import get_generation
from storage.intake import IntakeLimits, intake_image, store_image
from storage.models import GenerationKind, GenerationStatus
from storage.recipe import Outpaint, Recipe, StyleRef
from storage.settings import Settings
from tests.test_jobs import submit
from tests.test_styles import write_style

SIZE = 64


def photo() -> Image.Image:
    """A photo-like picture: a soft gradient with a bright disc and a dark box on it."""
    ramp = np.linspace(60, 140, SIZE, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp * 0.5, ramp * 0.5)] * 3, axis=2).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 32, 32), fill=(240, 220, 200))
    draw.rectangle((38, 36, 58, 58), fill=(20, 30, 40))
    return image


def around_shapes(reach: int, *, filled: bool = False) -> np.ndarray:
    """Pixels within ``reach`` of the disc's and the box's edges (or of their insides)."""
    mask = Image.new("L", (SIZE, SIZE))
    draw = ImageDraw.Draw(mask)
    draw.ellipse((8, 8, 32, 32), outline=255, fill=255 if filled else None, width=1)
    draw.rectangle((38, 36, 58, 58), outline=255, fill=255 if filled else None, width=1)
    kernel = np.ones((2 * reach + 1, 2 * reach + 1), dtype=np.uint8)
    return cv2.dilate(np.asarray(mask), kernel) > 0


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def recipe(*controls: ControlRef, **changes: object) -> Recipe:
    values: dict[str, object] = {
        "model": "tiny",
        "prompt": "a lighthouse",
        "seed": 7,
        "width": SIZE,
        "height": SIZE,
        "steps": 3,
        "guidance": 5.0,
        "count": 1,
        "controls": controls,
    }
    values.update(changes)
    return Recipe.model_validate(values)


KEY = blob_key(b"the uploaded control image")


def control(kind: str = "canny", **changes: object) -> ControlRef:
    return ControlRef.model_validate({"type": kind, "source_key": KEY, **changes})


@pytest.fixture(scope="module")
def controls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("controls")
    write_tiny_controls(folder, "tiny-sd", ("canny", "depth", "pose"))
    write_tiny_controls(folder, "tiny-sdxl", ("canny",))
    return folder


@pytest.fixture(scope="module")
def control_engine(controls_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    styles = tmp_path_factory.mktemp("control-styles")
    build_tiny_lora(build_tiny_sd().unet, styles / "ink.safetensors", seed=3)
    write_style(styles, "ink", "ink.safetensors")
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("control-data"),
        model="tiny",
        device="cpu",
        styles_dir=styles,
        controls_dir=controls_dir,
    )
    return Engine.from_settings(settings)


def engine_for(model: str, controls_dir: Path, data_dir: Path) -> Engine:
    """A CPU engine running ``model`` with the controls in ``controls_dir``."""
    settings = Settings(data_dir=data_dir, model=model, device="cpu", controls_dir=controls_dir)
    return Engine.from_settings(settings)


def generate(engine: Engine, *controls: ControlRef, **changes: object) -> Image.Image:
    made = recipe(*controls, **changes)
    maps = [engine.control_map(ref, photo(), made)[1] for ref in controls]
    return engine.txt2img(made, maps=maps)[0].image


@pytest.fixture(scope="module")
def plain(control_engine: Engine) -> np.ndarray:
    return pixels(generate(control_engine))


# -- preprocessors ------------------------------------------------------------------------------


def test_canny_draws_edges_where_the_shapes_are_and_nowhere_else() -> None:
    canny = Canny(100, 200)
    edges = pixels(canny(photo()))
    assert edges.shape == (SIZE, SIZE, 3)
    on = edges[:, :, 0] > 0
    assert on.sum() > 40  # the outlines of the disc and the box
    assert not (on & ~around_shapes(2)).any()  # not on the smooth gradient
    assert np.array_equal(edges, pixels(canny(photo())))  # deterministic
    assert canny.identity.startswith("opencv-") and canny.identity.endswith(":canny(100,200)")


@pytest.mark.parametrize("preprocessor", [Scribble(), Lineart()], ids=["scribble", "lineart"])
def test_scribble_and_lineart_trace_the_outlines(preprocessor: Scribble | Lineart) -> None:
    lines = pixels(preprocessor(photo()))
    assert lines.shape == (SIZE, SIZE, 3)
    on = lines[:, :, 0] > 64
    assert on.sum() > 20
    # Their blurs are sized for 512-pixel pictures: thick strokes, but only on the shapes.
    assert not (on & ~around_shapes(9, filled=True)).any()
    assert (on & around_shapes(1)).sum() > 20


def test_depth_is_a_full_range_grey_map(control_engine: Engine) -> None:
    ref, depth = control_engine.control_map(control("depth"), photo(), recipe())
    values = pixels(depth)
    assert depth.mode == "RGB" and depth.size == (SIZE, SIZE)
    assert (values[:, :, 0] == values[:, :, 1]).all() and (values[:, :, 1] == values[:, :, 2]).all()
    assert values.min() == 0 and values.max() == 255
    assert ref.preprocessor is not None and ref.preprocessor.startswith("DPTForDepthEstimation:")
    assert ref.preprocessor.split("@")[1] != ""  # the estimator's weights hash


def test_pose_is_an_openpose_skeleton_on_black(control_engine: Engine) -> None:
    ref, skeleton = control_engine.control_map(control("pose"), photo(), recipe())
    assert skeleton.mode == "RGB" and skeleton.size == (SIZE, SIZE)
    values = pixels(skeleton)
    assert (values.sum(axis=2) == 0).mean() > 0.3  # a drawing on black, not a photo
    assert ref.preprocessor is not None and "VitPoseForPoseEstimation" in ref.preprocessor
    # The drawing itself: OpenPose's colours, the neck-to-right-shoulder limb in its own.
    points: list[tuple[float, float] | None] = [None] * 18
    points[1], points[2] = (32.0, 10.0), (20.0, 10.0)
    drawn = pixels(draw_openpose((SIZE, SIZE), points))
    assert tuple(drawn[10, 26]) == (153, 0, 0)  # 0.6 × OpenPose's red, between the two
    assert tuple(drawn[10, 32]) == (255, 85, 0)  # the neck's own colour
    assert drawn[40:, :].sum() == 0


def test_raw_map_is_used_as_it_is(control_engine: Engine) -> None:
    ref, image = control_engine.control_map(control("depth", raw=True), photo(), recipe())
    assert np.array_equal(pixels(image), pixels(photo()))
    assert ref.preprocessor == Unchanged().identity == "raw"


# -- the registry -------------------------------------------------------------------------------


def test_registry_reads_controls_and_refuses_bad_files(controls_dir: Path, tmp_path: Path) -> None:
    registry = ControlRegistry.from_folder(controls_dir)
    assert registry.types_for("tiny-sd") == ["canny", "depth", "pose"]
    canny = registry.find("canny", "tiny-sd")
    assert Path(canny.model).is_dir() and canny.preprocessor == {
        "low_threshold": 100,
        "high_threshold": 200,
    }
    (tmp_path / "a.toml").write_text('type = "edges"\nmodel = "x/y"\nfamily = "sd15"\n')
    (tmp_path / "b.toml").write_text('type = "canny"\nmodel = "x/y"\nfamily = "sd15"\n')
    (tmp_path / "c.toml").write_text('type = "canny"\nmodel = "x/z"\nfamily = "sd15"\n')
    (tmp_path / "d.toml").write_text(
        'type = "depth"\nmodel = "x/y"\nfamily = "sd15"\n[preprocessor]\nradius = 3\n'
    )
    problems = ControlRegistry.from_folder(tmp_path).problems
    assert len(problems) == 3
    assert "a.toml: type 'edges' is not one of canny, depth" in problems[0]
    assert "c.toml: b.toml already declares" in problems[1]
    assert "the depth preprocessor has no setting 'radius' (it has model)" in problems[2]
    assert parse_control(tmp_path / "b.toml").model == "x/y"  # a hub id stays one


def test_a_control_the_family_lacks_is_refused_naming_what_there_is(
    controls_dir: Path,
) -> None:
    registry = ControlRegistry.from_folder(controls_dir)
    with pytest.raises(ControlError) as refused:
        registry.find("depth", "tiny-sdxl")
    assert str(refused.value) == (
        "There is no depth control for tiny-sdxl models; controls for tiny-sdxl models here: "
        "canny. (depth is installed for tiny-sd.)"
    )
    with pytest.raises(ControlError, match="no controls are installed for sd15 models"):
        registry.find("canny", "sd15")


def test_flux_schnell_and_sd3_turbo_run_the_controls_of_their_base_family(
    tmp_path: Path,
) -> None:
    def declare(name: str, kind: str, family: str) -> None:
        (tmp_path / f"{name}.toml").write_text(
            f'type = "{kind}"\nmodel = "someone/{name}"\nfamily = "{family}"\n'
        )

    declare("canny-flux", "canny", "flux")
    declare("depth-flux", "depth", "flux")
    declare("canny-sd3", "canny", "sd3")
    declare("canny-schnell", "canny", "flux-schnell")  # a family's own wins over its base's
    declare("pose-schnell", "pose", "flux-schnell")
    registry = ControlRegistry.from_folder(tmp_path)
    assert registry.problems == []
    assert registry.find("depth", "flux-schnell").name == "depth-flux"
    assert registry.find("canny", "flux-schnell").name == "canny-schnell"
    assert registry.types_for("flux-schnell") == ["canny", "depth", "pose"]
    assert registry.find("canny", "sd3-turbo").name == "canny-sd3"
    assert registry.types_for("sd3-turbo") == ["canny"]
    with pytest.raises(ControlError) as refused:  # a variant's control does not serve the base
        registry.find("pose", "flux")
    assert str(refused.value) == (
        "There is no pose control for flux models; controls for flux models here: canny, "
        "depth. (pose is installed for flux-schnell.)"
    )
    # What the engine asks when a job runs (generation/controlnet.py).
    settings = Settings(data_dir=tmp_path)
    schnell = ControlNets(registry, settings, "flux-schnell", torch.device("cpu"), torch.float32)
    assert schnell.spec("depth").name == "depth-flux"


def test_bad_flags_are_refused_with_a_sentence() -> None:
    with pytest.raises(ControlError, match=r"--cstart 0.5 must be below --cend 0.5"):
        make_control("canny", start=0.5, end=0.5, source_key=KEY)
    with pytest.raises(ControlError, match=r"--cw 2.5 is out of range"):
        make_control("canny", weight=2.5, source_key=KEY)
    with pytest.raises(ControlError, match="--control edges is not a control type; use canny"):
        make_control("edges", source_key=KEY)
    with pytest.raises(ValidationError, match=r"--cstart 0\.7 must be below --cend 0\.2"):
        control(start=0.7, end=0.2)
    three = (control(), control("depth"), control("pose"))
    with pytest.raises(ControlError, match="At most 2 controls can steer one image; 3 were"):
        check_controls(three)
    with pytest.raises(ValidationError):
        recipe(*three)


# -- generations --------------------------------------------------------------------------------


def test_a_control_steers_the_image_and_weight_zero_is_no_control(
    control_engine: Engine, plain: np.ndarray
) -> None:
    steered = pixels(generate(control_engine, control(weight=1.0)))
    assert np.abs(steered - plain).mean() > 2
    unweighted = pixels(generate(control_engine, control(weight=0.0)))
    assert np.abs(unweighted - plain).max() <= 1


def test_the_guidance_window_is_honoured(control_engine: Engine, plain: np.ndarray) -> None:
    full = pixels(generate(control_engine, control()))
    # Three steps at 0, 1/3 and 2/3 of the way: a window of [0.9, 1] covers none of them.
    none = pixels(generate(control_engine, control(start=0.9, end=1.0)))
    assert np.abs(none - plain).max() <= 1
    first_half = pixels(generate(control_engine, control(start=0.0, end=0.5)))
    assert np.abs(first_half - plain).mean() > 1
    assert np.abs(first_half - full).mean() > 1


def test_two_controls_and_a_style_in_one_job_reproduce_to_the_byte(
    control_engine: Engine, plain: np.ndarray
) -> None:
    controls = (control(weight=0.8), control("depth", weight=0.6, start=0.0, end=0.8))
    made = recipe(*controls, styles=(StyleRef(name="ink", weight=0.8),), count=2, steps=2)
    maps = [control_engine.control_map(ref, photo(), made)[1] for ref in controls]
    first = control_engine.txt2img(made, maps=maps)
    again = control_engine.txt2img(made, maps=maps)
    assert [image.png for image in first] == [image.png for image in again]
    assert np.abs(pixels(first[0].image) - plain).mean() > 2
    embedded = read_recipe(first[1].png)
    assert embedded.seed == 8 and [c.type for c in embedded.controls] == ["canny", "depth"]
    assert embedded.controls[0].model == "canny-tiny-sd" and embedded.controls[0].model_hash
    with Image.open(io.BytesIO(first[0].png)) as png:
        parameters = png.info["parameters"]
    assert "Lora hashes: " in parameters
    assert (
        f'ControlNet 1: "Module: depth_midas, Model: depth-tiny-sd '
        f"[{embedded.controls[1].model_hash}], Weight: 0.6, Resize Mode: Crop and Resize, "
        'Guidance Start: 0, Guidance End: 0.8, Control Mode: Balanced"'
    ) in parameters


def test_img2img_takes_a_control(control_engine: Engine) -> None:
    made = recipe(control(), strength=0.7)
    (_, canny_map) = control_engine.control_map(made.controls[0], photo(), made)
    source = Image.new("RGB", (SIZE, SIZE), (120, 90, 60))
    plain = control_engine.img2img(recipe(strength=0.7), source)[0].image
    steered = control_engine.img2img(made, source, maps=[canny_map])[0].image
    assert np.abs(pixels(steered) - pixels(plain)).mean() > 1


def test_tiny_sdxl_runs_a_control_and_refuses_one_it_lacks(
    controls_dir: Path, tmp_path: Path
) -> None:
    engine = engine_for("tiny-sdxl", controls_dir, tmp_path)
    made = recipe(control(), model="tiny-sdxl")
    _, edges = engine.control_map(made.controls[0], photo(), made)
    steered = engine.txt2img(made, maps=[edges])[0].image
    plain = engine.txt2img(recipe(model="tiny-sdxl"))[0].image
    assert np.abs(pixels(steered) - pixels(plain)).mean() > 1
    with pytest.raises(ControlError, match="There is no pose control for tiny-sdxl models"):
        engine.control_map(control("pose"), photo(), made)


async def test_the_job_stores_the_map_once_and_then_reuses_it(
    control_engine: Engine, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    buffer = io.BytesIO()
    photo().save(buffer, format="PNG")
    source_key = await blobs.put(buffer.getvalue())
    queued = recipe(make_control("canny", weight=0.9, source_key=source_key))
    made, maps = await control_maps(blobs, control_engine, queued)
    ref = made.controls[0]
    assert ref.map_key is not None and ref.preprocessor is not None
    assert ref.preprocessor.endswith("canny(100,200)")
    stored = Image.open(io.BytesIO(await blobs.get(ref.map_key)))
    assert np.array_equal(pixels(stored), pixels(maps[0]))
    await blobs.delete(source_key)  # a stored map no longer needs its source
    again, maps_again = await control_maps(blobs, control_engine, made)
    assert again == made and np.array_equal(pixels(maps_again[0]), pixels(maps[0]))


async def test_the_map_lines_up_with_the_image_prompt_at_another_shape(
    control_engine: Engine, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    # A square picture with a dark box above its middle; the generation is 2:1.
    square = Image.new("RGB", (2 * SIZE, 2 * SIZE), (200, 200, 200))
    ImageDraw.Draw(square).rectangle((20, 40, 60, 60), fill=(20, 20, 20))
    kept = intake_image(png_bytes(square), IntakeLimits(max_bytes=2**20, max_pixels=2**20))
    image = await store_image(blobs, kept)
    ref = make_control("canny", source_key=image.blob_key)
    made = recipe(ref, width=2 * SIZE, height=SIZE, init_image=image, image_weight=1, strength=0.6)
    init = await image_prompt_source(blobs, made)
    _, (edges,) = await control_maps(blobs, control_engine, made)
    assert init.size == edges.size == (2 * SIZE, SIZE)
    box = np.argwhere(pixels(init)[:, :, 0] < 100)
    drawn = np.argwhere(pixels(edges)[:, :, 0] > 0)
    # The image prompt is cropped about its centre; the map is made from the same crop,
    # so its edges are the box's outline, where the box is in the image prompt.
    assert np.abs(drawn.min(axis=0) - box.min(axis=0)).max() <= 1
    assert np.abs(drawn.max(axis=0) - box.max(axis=0)).max() <= 1


@pytest.fixture(scope="module")
def transformer_controls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("transformer-controls")
    write_tiny_controls(folder, "tiny-sd3", ("canny",))
    write_tiny_controls(folder, "tiny-flux", ("canny", "depth"))
    return folder


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_sd3_and_flux_run_controls_and_weight_zero_is_no_control(
    model: str, transformer_controls: Path, tmp_path: Path
) -> None:
    engine = engine_for(model, transformer_controls, tmp_path)
    guidance = 3.5 if model == "tiny-flux" else 5.0
    plain = pixels(generate(engine, model=model, steps=2, guidance=guidance))
    steered = generate(engine, control(), model=model, steps=2, guidance=guidance)
    assert np.abs(pixels(steered) - plain).mean() > 2
    unweighted = generate(engine, control(weight=0.0), model=model, steps=2, guidance=guidance)
    assert np.abs(pixels(unweighted) - plain).max() <= 1
    # FLUX runs two controls through a FluxMultiControlNetModel.
    kinds = ("canny", "depth") if model == "tiny-flux" else ("canny",)
    made = recipe(*(control(k, weight=0.7) for k in kinds), model=model, steps=2, guidance=guidance)
    maps = [engine.control_map(ref, photo(), made)[1] for ref in made.controls]
    first, again = engine.txt2img(made, maps=maps), engine.txt2img(made, maps=maps)
    assert first[0].png == again[0].png
    assert [c.model for c in read_recipe(first[0].png).controls] == [f"{k}-{model}" for k in kinds]


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_each_image_of_a_controlled_grid_is_its_own_recipe_run_alone(
    model: str, transformer_controls: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(model, transformer_controls, tmp_path)
    made = recipe(control(), model=model, steps=2, guidance=5.0, count=4)
    maps = [engine.control_map(made.controls[0], photo(), made)[1]]
    grid = engine.txt2img(made, maps=maps, encode=False)
    # The map's latents come from each image's own seed, not from its place in the batch;
    # batched matmuls may round differently (1/255).
    for image in grid:
        (alone,) = engine.txt2img(image.recipe, maps=maps, encode=False)
        assert alone.seed == image.seed
        assert np.abs(pixels(alone.image) - pixels(image.image)).max() <= 1
    monkeypatch.setenv(TEST_FAULT_ENV, "oom:lighthouse")  # the grid again, one image at a time
    for image, again in zip(grid, engine.txt2img(made, maps=maps, encode=False), strict=True):
        assert np.abs(pixels(again.image) - pixels(image.image)).max() <= 1


def test_flux_variations_take_controls_and_sd3_ones_are_refused(
    transformer_controls: Path, tmp_path: Path
) -> None:
    source = Image.new("RGB", (SIZE, SIZE), (120, 90, 60))
    for model in ("tiny-flux", "tiny-sd3"):
        engine = engine_for(model, transformer_controls, tmp_path / model)
        made = recipe(control(), model=model, strength=0.7, steps=2, guidance=3.5)
        (_, edges) = engine.control_map(made.controls[0], photo(), made)
        if model == "tiny-sd3":
            # /imagine refuses it before queueing with the same sentence (bot/submit.py).
            sentence = FAMILIES[model].control_refusal("img2img") or ""
            assert sentence.startswith("tiny SD3 models take controls only on text-to-image")
            with pytest.raises(ControlError, match=re.escape(sentence)):
                engine.img2img(made, source, maps=[edges])
            continue
        assert FAMILIES[model].control_refusal("img2img") is None
        plain = engine.img2img(recipe(model=model, strength=0.7, steps=2), source)[0].image
        steered = engine.img2img(made, source, maps=[edges])[0].image
        assert np.abs(pixels(steered) - pixels(plain)).mean() > 1
        unweighted = recipe(control(weight=0.0), model=model, strength=0.7, steps=2)
        none = engine.img2img(unweighted, source, maps=[edges])[0].image
        assert np.abs(pixels(none) - pixels(plain)).max() <= 1


PAN = Outpaint(left=0, top=0, right=SIZE // 2, bottom=0, action="pan right")


def test_flux_zoom_out_and_pan_take_controls_and_keep_the_source(
    transformer_controls: Path, tmp_path: Path
) -> None:
    engine = engine_for("tiny-flux", transformer_controls, tmp_path)
    source = photo().crop((0, 0, SIZE // 2, SIZE))  # the disc; the box is in the new half
    panned = {"model": "tiny-flux", "steps": 2, "guidance": 3.5, "outpaint": PAN, "count": 2}
    made = recipe(control(), **panned)
    (_, edges) = engine.control_map(made.controls[0], photo(), made)
    plain = engine.outpaint(recipe(**panned), source)
    steered = engine.outpaint(made, source, maps=[edges])
    for image, without in zip(steered, plain, strict=True):
        assert image.image.size == (SIZE, SIZE)
        kept, new = np.split(pixels(image.image), 2, axis=1)
        assert np.array_equal(kept, pixels(source))  # the source's own pixels, unchanged
        new_without = np.split(pixels(without.image), 2, axis=1)[1]
        assert np.abs(new - new_without).mean() > 2  # the control steers the new half
    # The same noise as without controls: a control at weight 0 changes nothing.
    unweighted = engine.outpaint(recipe(control(weight=0.0), **panned), source, maps=[edges])
    for image, without in zip(unweighted, plain, strict=True):
        assert np.abs(pixels(image.image) - pixels(without.image)).max() <= 1
    again = engine.outpaint(made, source, maps=[edges])
    assert [image.png for image in again] == [image.png for image in steered]
    embedded = read_recipe(steered[1].png)
    assert embedded.outpaint == PAN and embedded.seed == made.seed_for(1)
    assert [c.model for c in embedded.controls] == ["canny-tiny-flux"]


def test_sd3_zoom_out_and_pan_refuse_controls_before_any_work(
    transformer_controls: Path, tmp_path: Path
) -> None:
    engine = engine_for("tiny-sd3", transformer_controls, tmp_path)
    made = recipe(control(), model="tiny-sd3", steps=2, outpaint=PAN)
    sentence = FAMILIES["tiny-sd3"].control_refusal("inpaint") or ""
    assert sentence.startswith("tiny SD3 models take controls only on text-to-image")
    assert "inpainting ControlNet" in sentence and "Leave the controls out" in sentence
    (_, edges) = engine.control_map(made.controls[0], photo(), made)
    heard: list[Progress] = []
    with pytest.raises(ControlError, match=re.escape(sentence)):
        engine.outpaint(
            made, photo().crop((0, 0, SIZE // 2, SIZE)), maps=[edges], progress=heard.append
        )
    assert not heard and engine._inpaint_pipe is None  # no pipeline made, no step run
    assert engine.controls is not None and not engine.controls._models  # no ControlNet loaded


def test_sd_zoom_out_and_pan_take_controls(control_engine: Engine) -> None:
    source = photo().crop((0, 0, SIZE // 2, SIZE))
    made = recipe(control(), steps=2, outpaint=PAN)
    (_, edges) = control_engine.control_map(made.controls[0], photo(), made)
    plain = control_engine.outpaint(recipe(steps=2, outpaint=PAN), source)[0].image
    steered = control_engine.outpaint(made, source, maps=[edges])[0].image
    kept, new = np.split(pixels(steered), 2, axis=1)
    assert np.array_equal(kept, pixels(source))
    assert np.abs(new - np.split(pixels(plain), 2, axis=1)[1]).mean() > 2


def test_a_refusal_without_a_stated_reason_names_what_the_family_takes() -> None:
    family = replace(FAMILIES["tiny-sd"], control_kinds=("txt2img", "img2img"))
    assert family.control_refusal("inpaint") == (
        "tiny-sd models take controls only on text-to-image and variation generations, not on "
        "an inpainting; leave the controls out of this one."
    )


async def test_a_pan_job_with_a_control_stores_its_map_and_keeps_the_source(
    database: Database, transformer_controls: Path, tmp_path: Path
) -> None:
    engine = engine_for("tiny-flux", transformer_controls, tmp_path / "data")
    blobs = LocalBlobStore(tmp_path / "blobs")
    flux = {"model": "tiny-flux", "steps": 2, "guidance": 3.5, "count": 1}
    first = await submit(database, GenerationKind.IMAGINE, recipe(**flux))
    made = await run_generation(database, blobs, engine, first, worker_name="w")
    source = made.images[0].image
    async with database.session() as session:
        source_id = (await get_generation(session, first)).images[0].id
    buffer = io.BytesIO()
    photo().save(buffer, format="PNG")
    ref = make_control("canny", source_key=await blobs.put(buffer.getvalue()))
    pan = recipe(ref, **flux, outpaint=PAN, source_image_id=source_id, width=SIZE + SIZE // 2)
    panned = await submit(database, GenerationKind.OUTPAINT, pan)
    outcome = await run_generation(database, blobs, engine, panned, worker_name="w")
    assert outcome.generation.status is GenerationStatus.SUCCEEDED
    async with database.session() as session:
        stored = await get_generation(session, panned)
    (control_ref,) = stored.recipe.controls
    assert control_ref.map_key is not None and control_ref.model == "canny-tiny-flux"
    image = Image.open(io.BytesIO(await blobs.get(stored.images[0].blob_key)))
    assert image.size == (SIZE + SIZE // 2, SIZE)
    assert np.array_equal(pixels(image)[:, :SIZE], pixels(source))  # PAN adds SIZE // 2
