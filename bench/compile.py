"""What ``IMAGINE_COMPILE=on`` buys and costs, measured against eager in one run.

Prints, never asserts:

  - warm-up seconds of the compiled engine (one size, or every --ar size with --all-sizes)
  - compiled / eager latency of one image, without and with a style (median, interleaved)
  - the largest pixel difference compiled vs eager (the engine tests accept 1 of 255)
  - graphs compiled while switching among three styles, two at once and none
  - the pixel difference fused QKV projections make (eager; used only without LoRA slots)
  - compiled / eager without style slots (IMAGINE_LORA_SLOTS=0): what the slots cost

    python bench/compile.py                      # tiny model, CPU (inductor needs g++)
    python bench/compile.py --arch sd15-full     # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/compile.py`, like the other benches

from bench.engine_overhead import interleaved, write_styles  # noqa: E402
from bench.full_size import build_loaded  # noqa: E402
from generation.compiled import CompilePlan, compiled_graphs, plan_compile  # noqa: E402
from generation.engine import Engine  # noqa: E402
from generation.loading import LoadedModel, load_model, pick_device, pick_dtype  # noqa: E402
from generation.styles import StyleRegistry  # noqa: E402
from storage.recipe import Recipe, StyleRef  # noqa: E402
from storage.settings import Settings  # noqa: E402
from storage.slot_rank import configured_slots  # noqa: E402

STYLE_RANKS = {"first": 4, "second": 8, "third": 16}


def pixels(engine: Engine, recipe: Recipe) -> np.ndarray:
    return np.asarray(engine.txt2img(recipe)[0].image, dtype=np.int16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "sd15-full", "sdxl-full"], default="tiny")
    parser.add_argument("--model", help="a model to load instead of --arch")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--all-sizes", action="store_true", help="warm up every --ar size")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="imagine-bench-"))
    settings = Settings(data_dir=work, model=args.model or args.arch, styles_dir=work / "styles")

    def load() -> LoadedModel:  # full size: built on the device, a fresh copy each time
        if args.model is None and args.arch != "tiny":
            device = pick_device(settings.device)
            return build_loaded(args.arch, device, pick_dtype(settings.dtype, device))
        return load_model(settings)

    eager_model = load()
    family = eager_model.family
    side = 64 if args.arch == "tiny" else (512 if args.arch == "sd15-full" else 1024)
    steps = args.steps or (4 if args.arch == "tiny" else 20)

    styles_dir = work / "styles"
    write_styles(eager_model.pipe.unet, styles_dir, family.name, STYLE_RANKS)
    registry = StyleRegistry.from_folder(styles_dir)
    eager = Engine(eager_model, styles=registry)
    plan = plan_compile("on", eager_model.device)
    # Slots sized as a worker sizes them at start: for the largest style (rank 16).
    slot_rank = configured_slots(settings, registry.lora_ranks())
    print(slot_rank.describe(), flush=True)
    compiled = Engine(load(), styles=registry, compile_plan=plan, lora_slot_rank=slot_rank)
    recipe = Recipe(
        model=settings.model,
        prompt="a lighthouse at dusk",
        seed=7,
        width=side,
        height=side,
        steps=steps,
        guidance=family.default_guidance,
        count=1,
    )
    styled = recipe.model_copy(update={"styles": (StyleRef(name="first", weight=0.8),)})
    print(
        f"model {settings.model} ({family.name}) on {eager_model.device} {eager_model.dtype}, "
        f"{side}x{side}, {steps} steps, median of {args.repeats}",
        flush=True,
    )

    graphs = compiled_graphs()
    sizes = None if args.all_sizes else [(side, side)]
    seconds = compiled.warm_up(sizes=sizes, count=1)
    print(
        f"warm-up: {seconds:.1f}s for {len(sizes or compiled.warm_up_sizes())} size(s), "
        f"{compiled_graphs() - graphs} graphs",
        flush=True,
    )

    engines = {"eager": eager, "compiled": compiled}
    for label, job in (("no style", recipe), ("one style", styled)):
        runs: dict[str, Callable[[], object]] = {
            name: partial(engine.txt2img, job) for name, engine in engines.items()
        }
        times = interleaved(runs, args.repeats)
        difference = np.abs(pixels(compiled, job) - pixels(eager, job)).max()
        print(
            f"{label}: compiled {times['compiled']:.3f}s / eager {times['eager']:.3f}s = "
            f"{times['compiled'] / times['eager']:.3f}; largest pixel difference {difference}/255",
            flush=True,
        )

    graphs = compiled_graphs()
    started = time.perf_counter()
    sequence = [(), ("first",), ("second",), ("third",), ("first", "second"), (), ("third",)]
    for names in sequence:
        refs = tuple(StyleRef(name=name, weight=0.8) for name in names)
        compiled.txt2img(recipe.model_copy(update={"styles": refs}))
    print(
        f"style switching: {len(sequence)} jobs in {time.perf_counter() - started:.1f}s, "
        f"{compiled_graphs() - graphs} recompilations",
        flush=True,
    )

    fused = Engine(load(), styles=registry, compile_plan=CompilePlan(False, "off"))
    fused.pipe.unet.fuse_qkv_projections()
    fused.pipe.vae.fuse_qkv_projections()
    difference = np.abs(pixels(fused, recipe) - pixels(eager, recipe)).max()
    print(f"fused QKV projections (eager): largest pixel difference {difference}/255", flush=True)

    # What the slots cost: the same compile with no style slots (and fused projections).
    bare = Engine(load(), styles=registry, compile_plan=plan, lora_slots=0)
    seconds = bare.warm_up(sizes=[(side, side)], count=1)
    runs = {"eager": partial(eager.txt2img, recipe), "bare": partial(bare.txt2img, recipe)}
    times = interleaved(runs, args.repeats)
    difference = np.abs(pixels(bare, recipe) - pixels(eager, recipe)).max()
    print(
        f"no style slots (IMAGINE_LORA_SLOTS=0, fused QKV): warm-up {seconds:.1f}s; compiled "
        f"{times['bare']:.3f}s / eager {times['eager']:.3f}s = "
        f"{times['bare'] / times['eager']:.3f}; largest pixel difference {difference}/255"
    )
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
