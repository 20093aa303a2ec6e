"""Styles: TOML recipes with LoRAs, loaded once, switched, combined, and refused clearly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generation.engine import Engine
from generation.metadata import read_recipe
from generation.styles import StyleError, StyleRegistry, UnknownStyle, parse_style
from generation.tiny import build_tiny_lora, build_tiny_sd, build_tiny_sdxl
from storage.recipe import Recipe, StyleRef
from storage.settings import Settings


def write_style(folder: Path, name: str, lora: str, **fields: object) -> Path:
    lines = [f'name = "{name}"', f'lora = "{lora}"']
    defaults: dict[str, object] = {
        "description": f"The {name} look",
        "default_weight": 0.8,
        "trigger_words": [f"{name}style"],
        "prompt_template": "{prompt}, " + name,
        "negative_template": "{negative}, blurry",
        "base_model_family": "tiny-sd",
    }
    defaults.update(fields)
    for key, value in defaults.items():
        if isinstance(value, str):
            lines.append(f"{key} = {value!r}".replace("'", '"'))
        elif isinstance(value, list):
            lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
        else:
            lines.append(f"{key} = {value}")
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def styles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("styles")
    sd_unet = build_tiny_sd().unet
    for seed, name in enumerate(["watercolor", "inkwash", "pixel", "neon"], start=1):
        build_tiny_lora(sd_unet, folder / f"{name}.safetensors", seed=seed)
        write_style(folder, name, f"{name}.safetensors")
    build_tiny_lora(build_tiny_sdxl().unet, folder / "xl-only.safetensors", seed=9)
    write_style(folder, "xlonly", "xl-only.safetensors")
    return folder


@pytest.fixture(scope="module")
def styled_engine(styles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("styled-data"),
        model="tiny",
        device="cpu",
        styles_dir=styles_dir,
        lora_cache_size=2,
    )
    return Engine.from_settings(settings)


def recipe(*styles: StyleRef, **changes: object) -> Recipe:
    values: dict[str, object] = {
        "model": "tiny",
        "prompt": "a lighthouse",
        "seed": 5,
        "width": 64,
        "height": 64,
        "steps": 3,
        "guidance": 5.0,
        "count": 1,
        "styles": styles,
    }
    values.update(changes)
    return Recipe.model_validate(values)


def run(engine: Engine, *styles: StyleRef) -> np.ndarray:
    image = engine.txt2img(recipe(*styles))[0].image
    return np.asarray(image, dtype=np.int16)


def test_registry_reads_every_valid_style(styles_dir: Path) -> None:
    registry = StyleRegistry.from_folder(styles_dir)
    assert registry.names() == ["inkwash", "neon", "pixel", "watercolor", "xlonly"]
    watercolor = registry.get("watercolor")
    assert watercolor.default_weight == 0.8
    assert watercolor.trigger_words == ("watercolorstyle",)
    assert watercolor.apply_to_prompt("a cat", "") == (
        "a cat, watercolor, watercolorstyle",
        "blurry",
    )
    assert len(watercolor.sha256) == 64


def test_unknown_style_suggests_the_closest_names(styles_dir: Path) -> None:
    registry = StyleRegistry.from_folder(styles_dir)
    with pytest.raises(UnknownStyle, match="did you mean watercolor"):
        registry.get("watercolour")
    with pytest.raises(UnknownStyle, match="available styles: inkwash, neon"):
        registry.get("zzz")


def test_search_keeps_every_style_reachable_by_typing(tmp_path: Path) -> None:
    lora = tmp_path / "shared.safetensors"
    build_tiny_lora(build_tiny_sd().unet, lora)
    for number in range(40):
        write_style(tmp_path, f"style-{number:02d}", lora.name)
    registry = StyleRegistry.from_folder(tmp_path)
    assert len(registry) == 40
    assert len(registry.search("")) == 25
    assert registry.search("style-37")[0] == "style-37"
    assert registry.search("37")[0] == "style-37"
    assert set(registry.search("style-3")[:10]) == {f"style-3{n}" for n in range(10)}


@pytest.mark.parametrize(
    ("lora", "fields", "expected"),
    [
        ("model.ckpt", {}, "not a .safetensors file"),
        ("missing.safetensors", {}, "does not exist"),
        ("ok.safetensors", {"base_model_family": "sd9"}, "base_model_family 'sd9'"),
        ("ok.safetensors", {"prompt_template": "no placeholder"}, "must contain {prompt}"),
        ("ok.safetensors", {"default_weight": 9}, "default_weight must be"),
    ],
)
def test_invalid_style_files_are_refused_with_the_fix(
    tmp_path: Path, lora: str, fields: dict[str, object], expected: str
) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    (tmp_path / "ok.safetensors").write_bytes(b"")
    path = write_style(tmp_path, "broken", lora, **fields)
    with pytest.raises(StyleError, match=expected.replace("{", r"\{").replace("}", r"\}")):
        parse_style(path)
    registry = StyleRegistry.from_folder(tmp_path)
    assert registry.names() == []
    assert len(registry.problems) == 1 and "broken.toml" in registry.problems[0]


def test_a_style_changes_the_image_and_no_style_restores_the_base(styled_engine: Engine) -> None:
    base = run(styled_engine)
    styled = run(styled_engine, StyleRef(name="watercolor", weight=1.0))
    assert np.abs(styled - base).mean() > 1
    assert np.array_equal(run(styled_engine), base)


def test_weights_matter_and_styles_combine(styled_engine: Engine) -> None:
    light = run(styled_engine, StyleRef(name="inkwash", weight=0.3))
    strong = run(styled_engine, StyleRef(name="inkwash", weight=1.5))
    assert np.abs(light - strong).mean() > 0.5
    ink = run(styled_engine, StyleRef(name="inkwash", weight=1.0))
    both = run(
        styled_engine, StyleRef(name="inkwash", weight=1.0), StyleRef(name="pixel", weight=1.0)
    )
    assert np.abs(both - ink).mean() > 0.5


def test_switching_back_reuses_the_resident_adapter(styled_engine: Engine) -> None:
    first = run(styled_engine, StyleRef(name="watercolor", weight=1.0))
    run(styled_engine, StyleRef(name="inkwash", weight=1.0))
    again = run(styled_engine, StyleRef(name="watercolor", weight=1.0))
    assert np.array_equal(first, again)


def test_the_lora_cache_is_bounded(styled_engine: Engine) -> None:
    for name in ("watercolor", "inkwash", "pixel", "neon"):
        run(styled_engine, StyleRef(name=name, weight=1.0))
        assert len(styled_engine.loras.resident) <= 2
    # Adapter names end in the LoRA's hash: two servers' "neon" styles stay apart.
    resident = [name.rsplit("_", 1)[0] for name in styled_engine.loras.resident]
    assert resident == ["style_pixel", "style_neon"]
    adapters = {name.rsplit("_", 1)[0] for name in styled_engine.pipe.get_list_adapters()["unet"]}
    assert adapters == {"style_pixel", "style_neon"}


def test_a_lora_for_another_model_is_refused(styled_engine: Engine) -> None:
    with pytest.raises(StyleError, match="does not fit the loaded model"):
        run(styled_engine, StyleRef(name="xlonly", weight=1.0))
    assert not any(name.startswith("style_xlonly") for name in styled_engine.loras.resident)


def test_the_recipe_records_each_style_with_its_weight_and_hash(
    styled_engine: Engine, styles_dir: Path
) -> None:
    image = styled_engine.txt2img(recipe(StyleRef(name="neon", weight=0.7)))[0]
    embedded = read_recipe(image.png)
    expected_hash = StyleRegistry.from_folder(styles_dir).get("neon").sha256
    assert embedded.styles == (StyleRef(name="neon", weight=0.7, sha256=expected_hash),)
    with Image.open(io.BytesIO(image.png)) as png:
        assert "<lora:neon:0.7>" in png.info["parameters"]
        assert f"neon: {expected_hash[:12]}" in png.info["parameters"]


def test_unknown_style_in_a_recipe_is_refused(styled_engine: Engine) -> None:
    with pytest.raises(UnknownStyle, match="did you mean neon"):
        run(styled_engine, StyleRef(name="neonn", weight=1.0))
