"""Engine overhead against bare diffusers, and the cost of switching styles.

Prints ratios measured in one run on one model, never absolute targets:

  (a) engine 4-image grid / bare ``pipe(...)`` call with the same settings  (target <= 1.05)
  (b) job alternating two resident styles / job staying on one style        (target <= 1.05)

Runs are interleaved and summarised by their median. ``--arch sd15-full`` or
``sdxl-full`` builds the full-size architectures at random weights on the device
(``bench/full_size.py``: configs in code, no downloads) for GPU runs, and also prints
images per second at batch 1, 2, 4.

    python bench/engine_overhead.py                      # tiny model, CPU
    python bench/engine_overhead.py --arch sdxl-full     # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.full_size import build_loaded
from generation.engine import Engine
from generation.loading import LoadedModel, load_model, pick_device, pick_dtype
from generation.styles import StyleRegistry
from generation.tiny import build_tiny_lora
from storage.recipe import Recipe, StyleRef
from storage.settings import Settings


def write_styles(unet: Any, styles_dir: Path, family: str, ranks: dict[str, int]) -> None:
    """A random LoRA of each rank in ``ranks`` and its style file, in a new ``styles_dir``."""
    styles_dir.mkdir()
    for seed, (name, rank) in enumerate(ranks.items(), start=1):
        build_tiny_lora(unet, styles_dir / f"{name}.safetensors", seed=seed, rank=rank)
        (styles_dir / f"{name}.toml").write_text(
            f'name = "{name}"\nlora = "{name}.safetensors"\nbase_model_family = "{family}"\n'
        )


def median_seconds(run: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].extend(median_seconds(run, 1))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "sd15-full", "sdxl-full"], default="tiny")
    parser.add_argument("--model", help="a model to load instead of --arch")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imagine-bench-"))
    settings = Settings(data_dir=work, model=args.model or args.arch, styles_dir=work / "styles")
    loaded: LoadedModel
    if args.model is None and args.arch != "tiny":  # full size: built on the device
        device = pick_device(settings.device)
        loaded = build_loaded(args.arch, device, pick_dtype(settings.dtype, device))
    else:
        loaded = load_model(settings)
    family = loaded.family
    side = (
        family.native_side if args.arch == "tiny" else (512 if args.arch == "sd15-full" else 1024)
    )
    steps = args.steps or (4 if args.arch == "tiny" else 20)

    styles_dir = work / "styles"
    write_styles(loaded.pipe.unet, styles_dir, family.name, {"first": 4, "second": 4})
    engine = Engine(loaded, styles=StyleRegistry.from_folder(styles_dir))
    recipe = Recipe(
        model=settings.model,
        prompt="a lighthouse at dusk",
        seed=7,
        width=side,
        height=side,
        steps=steps,
        guidance=family.default_guidance,
    )
    print(
        f"model {settings.model} ({family.name}) on {loaded.device} {loaded.dtype}, "
        f"{side}x{side}, {steps} steps, median of {args.repeats}",
        flush=True,
    )

    def bare(count: int = 4) -> object:
        generators = [torch.Generator("cpu").manual_seed(recipe.seed_for(i)) for i in range(count)]
        return loaded.pipe(
            prompt=recipe.prompt,
            num_images_per_prompt=count,
            num_inference_steps=steps,
            guidance_scale=recipe.guidance,
            width=side,
            height=side,
            generator=generators,
        )

    grid = interleaved(
        {
            "bare": bare,
            "engine": lambda: engine.txt2img(recipe),
            # The worker's critical path: it encodes the PNGs on CPU threads meanwhile.
            "unencoded": lambda: engine.txt2img(recipe, encode=False),
        },
        args.repeats,
    )
    ratio_a = grid["engine"] / grid["bare"]
    print(
        f"(a) grid of 4: engine {grid['engine']:.3f}s / bare diffusers {grid['bare']:.3f}s "
        f"= {ratio_a:.3f} (target <= 1.05); without the PNGs (as a worker waits) "
        f"{grid['unencoded']:.3f}s = {grid['unencoded'] / grid['bare']:.3f}",
        flush=True,
    )

    one = recipe.model_copy(update={"count": 1})
    first = one.model_copy(update={"styles": (StyleRef(name="first", weight=0.8),)})
    second = one.model_copy(update={"styles": (StyleRef(name="second", weight=0.8),)})
    engine.txt2img(first)
    engine.txt2img(second)  # both resident from here on

    def staying() -> None:
        engine.txt2img(first)
        engine.txt2img(first)

    def switching() -> None:
        engine.txt2img(first)
        engine.txt2img(second)

    switch = interleaved({"stay": staying, "switch": switching}, args.repeats)
    ratio_b = switch["switch"] / switch["stay"]
    print(
        f"(b) two jobs switching styles {switch['switch']:.3f}s / staying on one "
        f"{switch['stay']:.3f}s = {ratio_b:.3f} (target <= 1.05)"
    )

    if args.arch != "tiny" or args.model:
        for batch in (1, 2, 4):
            seconds = statistics.median(median_seconds(lambda b=batch: bare(b), 3))
            print(f"batch {batch}: {batch / seconds:.2f} images/s ({seconds:.3f}s per call)")
    return 0 if ratio_a <= 1.05 and ratio_b <= 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
