"""IMAGINE_COMPILE=on on the CPU: inductor really compiles the tiny model, and styles
swap into its LoRA slots without a single recompilation.

One compiled engine, warmed up at one size, serves every test here: compiling is the
expensive part (about a minute on two cores with a cold inductor cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from prometheus_client import generate_latest

import generation.compiled
from generation.compiled import (
    Shape,
    WarmShapes,
    compiled_graphs,
    eager_runs,
    keep_compiled_kernels,
    plan_compile,
    recompilations,
)
from generation.engine import Engine
from generation.lora import LoraSlots
from generation.metrics import WorkerMetrics
from generation.styles import StyleError, StyleRegistry
from generation.tiny import build_tiny_lora, build_tiny_sd
from storage.errors import ConfigError
from storage.recipe import Recipe, StyleRef
from storage.settings import Settings, parse_ratios
from storage.style_store import StyleRefused, check_rank, inspect_lora
from tests.test_styles import write_style

MAX_RANK = 16
STYLE_RANKS = {"watercolor": 4, "inkwash": 8, "pixel": 16, "huge": 32}


@pytest.fixture(scope="module")
def styles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("compile-styles")
    pipe: Any = build_tiny_sd()
    unet = pipe.unet
    for seed, (name, rank) in enumerate(STYLE_RANKS.items(), start=1):
        build_tiny_lora(unet, folder / f"{name}.safetensors", seed=seed, rank=rank)
        write_style(folder, name, f"{name}.safetensors")
    return folder


def engine_settings(data_dir: Path, styles_dir: Path, compile: Literal["on", "off"]) -> Settings:
    return Settings(
        data_dir=data_dir,
        model="tiny",
        device="cpu",
        styles_dir=styles_dir,
        compile=compile,
        lora_slots=2,
        lora_max_rank=MAX_RANK,
    )


@pytest.fixture(scope="module", autouse=True)
def recompiling_fails() -> Any:
    """A worker runs a warmed-up shape whose guards fail eagerly; here that would hide a
    recompilation, so it raises instead."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation.compiled, "STANCE_AFTER_WARM_UP", "fail_on_recompile")
        yield


@pytest.fixture(scope="module")
def compiled(styles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    data = tmp_path_factory.mktemp("compiled-data")
    engine = Engine.from_settings(engine_settings(data, styles_dir, "on"))
    engine.warm_up(sizes=[(64, 64)], count=1)
    return engine


@pytest.fixture(scope="module")
def eager(styles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    data = tmp_path_factory.mktemp("eager-data")
    return Engine.from_settings(engine_settings(data, styles_dir, "off"))


def recipe(*styles: StyleRef) -> Recipe:
    return Recipe(
        model="tiny",
        prompt="a lighthouse",
        seed=5,
        width=64,
        height=64,
        steps=2,
        guidance=5.0,
        count=1,
        styles=styles,
    )


def run(engine: Engine, *styles: str) -> np.ndarray:
    refs = [StyleRef(name=name, weight=0.9) for name in styles]
    image = engine.txt2img(recipe(*refs))[0].image
    return np.asarray(image, dtype=np.int16)


def test_auto_compiles_only_on_cuda() -> None:
    import torch

    assert not plan_compile("auto", torch.device("cpu")).enabled
    assert "off" in plan_compile("auto", torch.device("mps")).reason
    assert plan_compile("auto", torch.device("cuda")).enabled
    assert plan_compile("on", torch.device("cpu")).enabled
    assert not plan_compile("off", torch.device("cuda")).enabled


def test_compiled_kernels_are_kept_in_the_data_folder_unless_the_owner_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert keep_compiled_kernels(tmp_path / "data" / "compiled") == tmp_path / "data" / "compiled"
    assert (tmp_path / "data" / "compiled").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    assert keep_compiled_kernels(tmp_path / "data" / "compiled") == tmp_path / "chosen"


def test_the_warm_up_leaves_its_kernels_in_the_cache_for_the_next_start(
    compiled: Engine,
) -> None:
    import os

    assert compiled.compile_plan.cache_dir is not None
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    # Inductor's compiled graphs (fxgraph) and generated kernels, where a restart finds them.
    assert (cache / "fxgraph").is_dir() and any((cache / "fxgraph").rglob("*"))


def test_on_without_a_cpp_compiler_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler"):
        plan_compile("on", torch.device("cpu"))


# Switching among three styles, two at once, and none, then back: the order matters.
SEQUENCE = {
    "plain": (),
    "watercolor": ("watercolor",),
    "inkwash": ("inkwash",),
    "pixel": ("pixel",),
    "none": (),
    "both": ("inkwash", "watercolor"),
    "again": ("watercolor",),
}


@pytest.fixture(scope="module")
def switching(compiled: Engine) -> tuple[dict[str, np.ndarray], int]:
    """The images of :data:`SEQUENCE` and the graphs compiled while making them."""
    graphs = compiled_graphs()
    images = {name: run(compiled, *styles) for name, styles in SEQUENCE.items()}
    return images, compiled_graphs() - graphs


def test_switching_styles_after_warm_up_never_recompiles(
    compiled: Engine, switching: tuple[dict[str, np.ndarray], int]
) -> None:
    assert isinstance(compiled.loras, LoraSlots)
    # The denoiser with and without its style slots, and the VAE decoder: really compiled.
    assert compiled_graphs() >= 3
    images, graphs = switching
    assert graphs == 0
    assert recompilations() == 0
    metrics = generate_latest(WorkerMetrics().registry).decode()
    assert "imagine_recompilations 0.0" in metrics
    first = images["watercolor"]
    assert np.abs(first - images["plain"]).mean() > 0.5
    for name in ("inkwash", "pixel", "both"):
        assert np.abs(images[name] - first).mean() > 0.5, name
    # Same recipe, same pixels, whatever the slots held before.
    assert np.array_equal(images["none"], images["plain"])
    assert np.array_equal(images["again"], first)


def test_compiled_images_equal_eager_ones_within_one_level(
    switching: tuple[dict[str, np.ndarray], int], eager: Engine
) -> None:
    images, _ = switching
    for name in ("plain", "pixel", "both"):
        difference = np.abs(images[name] - run(eager, *SEQUENCE[name])).max()
        assert difference <= 1, (name, difference)


def test_a_style_above_the_slot_rank_is_refused(compiled: Engine, styles_dir: Path) -> None:
    # The styles folder's largest is rank 32: the slots stop at IMAGINE_LORA_MAX_RANK.
    assert isinstance(compiled.loras, LoraSlots) and compiled.loras.rank == MAX_RANK
    with pytest.raises(StyleError, match=r"has rank 32, above IMAGINE_LORA_MAX_RANK \(16\)"):
        run(compiled, "huge")
    data = (styles_dir / "huge.safetensors").read_bytes()
    info = inspect_lora(data, "huge.safetensors", 2**30)
    assert info.rank == 32
    with pytest.raises(StyleRefused, match="rank-32 LoRA; this bot takes styles up to rank 16"):
        check_rank(info, MAX_RANK, "huge.safetensors")
    pixel = inspect_lora((styles_dir / "pixel.safetensors").read_bytes(), "p.safetensors", 2**30)
    check_rank(pixel, MAX_RANK, "p.safetensors")  # rank 16 is fine


def test_a_style_added_after_the_start_above_the_slots_makes_them_grow(
    styles_dir: Path, tmp_path: Path, eager: Engine
) -> None:
    import torch

    folder = tmp_path / "styles"
    folder.mkdir()
    (folder / "watercolor.safetensors").write_bytes(
        (styles_dir / "watercolor.safetensors").read_bytes()
    )
    write_style(folder, "watercolor", "watercolor.safetensors")
    settings = engine_settings(tmp_path, folder, "on")
    engine = Engine.from_settings(settings)  # compiles lazily: nothing runs here
    assert isinstance(engine.loras, LoraSlots) and engine.loras.rank == 8  # for rank 4
    # A rank-16 style added while it runs, as /style add puts a server's style in.
    for name in ("inkwash", "pixel"):
        engine.styles.put(StyleRegistry.from_folder(styles_dir).get(name))
    with torch.compiler.set_stance("force_eager"):  # the slots' work, without compiling
        grown = {name: run(engine, *styles) for name, styles in SEQUENCE.items()}
    assert engine.loras.rank == 16
    for name in ("pixel", "watercolor", "both"):
        difference = np.abs(grown[name] - run(eager, *SEQUENCE[name])).max()
        assert difference <= 1, (name, difference)
    assert np.array_equal(grown["none"], grown["plain"])
    # A rank the owner fixed does not grow: the style is refused with both ranks.
    fixed = Engine.from_settings(settings.model_copy(update={"lora_slot_rank": "8"}))
    with pytest.raises(StyleError, match=r"IMAGINE_LORA_SLOT_RANK=8\); it runs once"):
        fixed.loras.activate([(StyleRegistry.from_folder(styles_dir).get("pixel"), 1.0)])
    assert fixed.loras.rank == 8 and fixed.loras.resident == []
    restarted = Engine.from_settings(settings, stored_style_rank=16)
    assert isinstance(restarted.loras, LoraSlots) and restarted.loras.rank == 16


def test_grown_slots_run_the_styled_jobs_uncompiled() -> None:
    warm = WarmShapes()
    with warm.warming_up(), warm.stance(Shape(64, 64, 1, 8)):
        pass
    before = eager_runs()
    with warm.stance(Shape(64, 64, 1, 8)):  # the warmed-up graph
        pass
    assert eager_runs() == before
    with warm.stance(Shape(64, 64, 1, 16)):  # its slots grew since
        pass
    assert eager_runs() == before + 1


def test_more_styles_than_slots_is_refused_with_the_setting(compiled: Engine) -> None:
    with pytest.raises(StyleError, match=r"at most 2 styles.*IMAGINE_LORA_SLOTS"):
        run(compiled, "watercolor", "inkwash", "pixel")


def test_a_worker_without_slots_refuses_styles_with_a_sentence(
    styles_dir: Path, tmp_path: Path
) -> None:
    settings = engine_settings(tmp_path, styles_dir, "on").model_copy(update={"lora_slots": 0})
    engine = Engine.from_settings(settings)  # compiles lazily: nothing runs here
    with pytest.raises(StyleError, match="This worker runs no styles"):
        run(engine, "watercolor")


def test_a_shape_the_warm_up_did_not_cover_runs_eagerly_instead_of_compiling(
    compiled: Engine, eager: Engine
) -> None:
    graphs, before = compiled_graphs(), eager_runs()
    two = recipe().model_copy(update={"count": 2})  # the warm-up compiled one image only
    images = [np.asarray(done.image, dtype=np.int16) for done in compiled.txt2img(two)]
    again = [np.asarray(done.image, dtype=np.int16) for done in eager.txt2img(two)]
    assert compiled_graphs() == graphs
    assert eager_runs() == before + 1
    for image, reference in zip(images, again, strict=True):
        assert np.abs(image - reference).max() <= 1
    metrics = generate_latest(WorkerMetrics().registry).decode()
    assert f"imagine_compile_eager_runs {float(eager_runs())}" in metrics


def test_the_warm_up_covers_the_ratios_the_owner_named(styles_dir: Path, tmp_path: Path) -> None:
    settings = engine_settings(tmp_path, styles_dir, "on")
    engine = Engine.from_settings(settings)  # compiles lazily: nothing runs here
    side = engine.family.native_side
    assert engine.warm_up_sizes() == [(side, side)]  # 1:1 alone by default: the native square
    wide = Engine.from_settings(settings.model_copy(update={"compile_sizes": "1:1, 16:9"}))
    square, (width, height) = wide.warm_up_sizes()
    assert square == (side, side) and width > height
    assert len(parse_ratios("all")) == 8
    with pytest.raises(ValueError, match="'3x2' is not a ratio: write W:H"):
        Settings(compile_sizes="1:1,3x2")
    with pytest.raises(ValueError, match="'0:1' is not a ratio"):
        Settings(compile_sizes="0:1")


def test_style_slots_cover_layers_a_lora_was_once_loaded_into(tmp_path: Path) -> None:
    from generation.lora import slot_targets

    fresh: Any = build_tiny_sd()
    used: Any = build_tiny_sd()
    build_tiny_lora(used.unet, tmp_path / "made.safetensors")  # leaves its layers wrapped
    assert any(name.endswith(".base_layer") for name, _ in used.unet.named_modules())
    assert slot_targets(used.unet) == slot_targets(fresh.unet)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k" in slot_targets(used.unet)
