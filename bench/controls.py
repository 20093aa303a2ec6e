"""A ControlNet job against a plain job: same model, size, steps and seed.

Prints the ratio of their times measured in one run (interleaved, median), never an
absolute target, for one and for two controls. ``--arch sd15-full`` or ``sdxl-full``
builds full-size random-weight models and a ControlNet made from the UNet as real ones
are (configs in code, no downloads) for GPU runs.

    python bench/controls.py                      # tiny model, CPU
    python bench/controls.py --arch sdxl-full     # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs as the README shows

from bench.engine_overhead import interleaved
from bench.full_size import save_full_size
from generation.controlnet import ControlNets
from generation.controls import ControlRegistry
from generation.engine import Engine
from generation.loading import load_model
from generation.tiny import write_tiny_controls
from storage.controls import make_control
from storage.recipe import Recipe
from storage.settings import Settings

TYPES = ("canny", "scribble")  # two controls that need no estimator model


def full_size_controls(unet: object, folder: Path, family: str) -> Path:
    """A random ControlNet per type, made from ``unet`` as real ones are, and its TOML."""
    from diffusers import ControlNetModel

    for control in TYPES:
        name = f"{control}-{family}"
        ControlNetModel.from_unet(unet).save_pretrained(folder / "models" / name)
        (folder / f"{name}.toml").write_text(
            f'name = "{name}"\ntype = "{control}"\nmodel = "models/{name}"\nfamily = "{family}"\n'
        )
    return folder


def shapes(side: int) -> Image.Image:
    """A picture with edges: a box and a disc on a plain ground."""
    image = Image.new("RGB", (side, side), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    draw.rectangle((side // 8, side // 8, side // 2, side // 2), fill=(220, 220, 220))
    draw.ellipse((side // 2, side // 2, 7 * side // 8, 7 * side // 8), fill=(160, 60, 60))
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "sd15-full", "sdxl-full"], default="tiny")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imagine-bench-controls-"))
    model = "tiny" if args.arch == "tiny" else str(save_full_size(args.arch, work / args.arch))
    settings = Settings(data_dir=work, model=model, controls_dir=work / "controls")
    loaded = load_model(settings)
    family = loaded.family
    folder = work / "controls"
    if args.arch == "tiny":
        write_tiny_controls(folder, family.name, TYPES)
    else:
        full_size_controls(loaded.pipe.unet, folder, family.name)
    registry = ControlRegistry.from_folder(folder)
    nets = ControlNets(registry, settings, family.name, loaded.device, loaded.dtype)
    engine = Engine(loaded, controls=nets)
    side = family.native_side if args.arch == "tiny" else (512 if "sd15" in args.arch else 1024)
    steps = args.steps or (4 if args.arch == "tiny" else 20)
    plain = Recipe(
        model=model,
        prompt="a lighthouse at dusk",
        seed=7,
        width=side,
        height=side,
        steps=steps,
        guidance=family.default_guidance,
    )
    source = shapes(side)
    refs, maps = [], []
    for control in TYPES:
        made, image = engine.control_map(make_control(control, source_key="0" * 64), source, plain)
        refs.append(made)
        maps.append(image)
    one = plain.model_copy(update={"controls": tuple(refs[:1])})
    two = plain.model_copy(update={"controls": tuple(refs)})
    print(
        f"model {model} ({family.name}) on {loaded.device} {loaded.dtype}, {side}x{side}, "
        f"{steps} steps, grid of 4, median of {args.repeats}",
        flush=True,
    )
    times = interleaved(
        {
            "plain": lambda: engine.txt2img(plain),
            "one": lambda: engine.txt2img(one, maps=maps[:1]),
            "two": lambda: engine.txt2img(two, maps=maps),
        },
        args.repeats,
    )
    for name, label in (("one", "one control"), ("two", "two controls")):
        print(
            f"{label}: {times[name]:.3f}s / plain {times['plain']:.3f}s "
            f"= {times[name] / times['plain']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
