"""Memory options for big models: CPU offload, int8/float8 weights, and doctor's advice."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bot.cli.doctor import FAIL, OK, check_memory
from generation.compiled import plan_compile
from generation.engine import Engine
from generation.loading import load_model
from generation.memory import GIB, advise, parameter_counts, place
from generation.tiny import build_tiny_lora, build_tiny_sd
from storage.errors import ConfigError
from storage.recipe import Recipe, StyleRef
from storage.settings import Settings

RECIPE = Recipe(
    model="tiny", prompt="a red bicycle", seed=7, width=64, height=64, steps=3, guidance=5.0
)


def _linear_weight_bytes(module: torch.nn.Module) -> int:
    total = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            weight = layer.weight
            inner = [getattr(weight, name) for name in getattr(weight, "tensor_data_names", [])]
            tensors = inner or [weight]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@pytest.fixture(scope="module")
def styled_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data_dir = tmp_path_factory.mktemp("memory-data")
    styles = data_dir / "styles"
    styles.mkdir()
    build_tiny_lora(build_tiny_sd().unet, styles / "neon.safetensors", seed=3)
    (styles / "neon.toml").write_text(
        'name = "neon"\nlora = "neon.safetensors"\nbase_model_family = "tiny-sd"\n'
    )
    return Settings(data_dir=data_dir, model="tiny", device="cpu", styles_dir=styles)


def test_int8_weights_are_quantised_recorded_and_reproducible(
    styled_settings: Settings,
) -> None:
    full = Engine.from_settings(styled_settings)
    engine = Engine.from_settings(styled_settings.model_copy(update={"quantize": "int8"}))
    full_bytes = _linear_weight_bytes(full.pipe.unet)
    assert _linear_weight_bytes(engine.pipe.unet) < 0.3 * full_bytes  # fp32 → int8 (+ scales)

    first = engine.txt2img(RECIPE)
    again = engine.txt2img(RECIPE)
    assert [image.png for image in first] == [image.png for image in again]
    recipe = first[0].recipe
    assert recipe.quantization == "int8"
    with Image.open(io.BytesIO(first[0].png)) as png:
        assert "Diffusion in Low Bits: int8" in png.info["parameters"]
    assert full.txt2img(RECIPE)[0].recipe.quantization is None

    # A style's LoRA goes on top of the int8 layers: it changes the picture as it does on
    # the full-precision model.
    styled_recipe = RECIPE.model_copy(update={"styles": (StyleRef(name="neon", weight=1.0),)})
    styled = pixels(engine.txt2img(styled_recipe)[0].image)
    styled_full = pixels(full.txt2img(styled_recipe)[0].image)
    change = np.abs(styled_full - pixels(full.txt2img(RECIPE)[0].image)).mean()
    assert change > 0.5
    assert np.abs(styled - pixels(first[0].image)).mean() > 0.5 * change
    assert np.abs(styled - styled_full).max() <= 3


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_model_offload_hooks_give_the_same_images(engine_settings: Settings) -> None:
    """The offload hooks (here with the CPU as the execution device, the only one this
    machine has) must not change a pixel, and must hold for the img2img pipeline made with
    ``from_pipe``."""
    plain = Engine.from_settings(engine_settings)
    loaded = load_model(engine_settings)
    place(loaded.pipe, torch.device("cpu"), "model")
    offloaded = Engine(loaded)
    assert [i.png for i in offloaded.txt2img(RECIPE)] == [i.png for i in plain.txt2img(RECIPE)]
    source = plain.txt2img(RECIPE.model_copy(update={"count": 1}))[0].image
    variation = RECIPE.model_copy(update={"strength": 0.6, "count": 1})
    assert offloaded.img2img(variation, source)[0].png == plain.img2img(variation, source)[0].png


def test_offload_on_a_cpu_worker_is_refused_with_a_sentence(engine_settings: Settings) -> None:
    with pytest.raises(ConfigError, match=r"runs on the CPU.*set IMAGINE_OFFLOAD=none"):
        load_model(engine_settings.model_copy(update={"offload": "model"}))


def test_sequential_offload_turns_compile_off_or_refuses_it() -> None:
    cuda = torch.device("cuda")
    assert not plan_compile("auto", cuda, "sequential").enabled
    assert plan_compile("auto", cuda, "model").enabled
    with pytest.raises(ConfigError, match="IMAGINE_OFFLOAD=model"):
        plan_compile("on", cuda, "sequential")


def _base_parameters(module: torch.nn.Module) -> int:
    # Other tests load style LoRAs into the shared engine: those are not the model's own.
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" not in name)


def test_parameter_counts_come_from_the_file_headers(tiny_engine: Engine) -> None:
    counts = parameter_counts(tiny_engine.loaded.source.path)
    pipe = tiny_engine.pipe
    assert counts["denoiser"] == _base_parameters(pipe.unet)
    assert counts["vae"] == _base_parameters(pipe.vae)
    assert counts["text_encoder"] == _base_parameters(pipe.text_encoder)


# A FLUX.1-dev-sized model: 11.9 B transformer, 4.76 B T5, CLIP-L and the VAE, in bf16.
FLUX_DEV = {"denoiser": 11_900_000_000, "t5": 4_760_000_000, "text_encoder": 123_000_000}
FLUX_DEV["vae"] = 84_000_000


@pytest.mark.parametrize(
    ("gpu_gib", "expected"),
    [
        (141, ("none", "none")),  # H200: everything on the GPU
        (80, ("none", "none")),
        (24, ("none", "int8")),  # a 4090: int8 weights fit whole
        (16, ("model", "int8")),
        (12, ("sequential", "none")),
        (1, None),
    ],
)
def test_advice_is_the_fastest_option_that_fits(
    gpu_gib: int, expected: tuple[str, str] | None
) -> None:
    best, sentence = advise(FLUX_DEV, 2, gpu_gib * GIB)
    assert (best.offload, best.quantize) == expected if best else expected is None
    assert "GiB" in sentence
    if best is not None and expected != ("none", "none"):
        assert f"IMAGINE_OFFLOAD={expected[0]} IMAGINE_QUANTIZE={expected[1]}" in sentence


def test_doctor_reports_memory_on_the_cpu_and_refuses_offload_there(
    engine_settings: Settings, tmp_path: Path
) -> None:
    check = check_memory(engine_settings)
    assert check.status == OK and "GiB of weights in cpu memory" in check.detail
    refused = check_memory(engine_settings.model_copy(update={"offload": "sequential"}))
    assert refused.status == FAIL and "IMAGINE_OFFLOAD=none" in refused.detail


def test_doctor_names_a_weights_file_cut_short(tiny_engine: Engine, tmp_path: Path) -> None:
    """An interrupted download: doctor says which file to fetch again, never a traceback."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_engine.loaded.source.path, folder)
    (weights,) = (folder / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:20])
    settings = Settings(data_dir=tmp_path / "data", model=str(folder), device="cpu")
    check = check_memory(settings)
    assert check.status == FAIL
    assert str(weights) in check.detail and "download it again" in check.detail
