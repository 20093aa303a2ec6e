"""SD 3.5 and FLUX.1 on the engine: overhead against bare diffusers, speed and peak memory
of each way to fit a big model (IMAGINE_OFFLOAD, IMAGINE_QUANTIZE), in one run.

Prints, never asserts:

  (a) one image: engine / bare ``pipe(...)`` call, everything on the GPU (median, interleaved),
      and the same without encoding the PNG, which a worker does on CPU threads meanwhile
  (b) for each memory option: seconds per image and images per second at ``--option-steps``,
      peak GPU memory (``torch.cuda.max_memory_allocated``), engine / bare for that option

Full-size architectures are built at random weights straight on the GPU
(``bench/full_size.py``, configs in code, no downloads). Without CUDA only the tiny models
run, and only option ``none`` (offload needs a GPU).

    python bench/big_models.py --arch tiny-flux                 # CPU: the code path
    python bench/big_models.py --arch flux-dev                  # on a GPU
    python bench/big_models.py --arch sd35-large --options none,model
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/big_models.py`, like the others

from bench.engine_overhead import interleaved  # noqa: E402
from bench.full_size import ARCHS, build_loaded  # noqa: E402
from generation.engine import Engine  # noqa: E402
from generation.loading import LoadedModel, load_model, pick_device, pick_dtype  # noqa: E402
from storage.recipe import Recipe  # noqa: E402
from storage.settings import Settings  # noqa: E402

OPTIONS = {  # name: (IMAGINE_OFFLOAD, IMAGINE_QUANTIZE)
    "none": ("none", "none"),
    "model": ("model", "none"),
    "sequential": ("sequential", "none"),
    "int8": ("none", "int8"),
    "float8": ("none", "float8"),
}
GIB = 2**30


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(args: argparse.Namespace, offload: str, quantize: str) -> LoadedModel:
    if args.arch in ARCHS:
        device = pick_device("auto")
        return build_loaded(
            args.arch, device, pick_dtype("auto", device), offload=offload, quantize=quantize
        )
    work = Path(tempfile.mkdtemp(prefix="imagine-bench-"))
    settings = Settings(data_dir=work, model=args.arch, offload=offload, quantize=quantize)
    return load_model(settings)


def bare_call(loaded: LoadedModel, recipe: Recipe) -> object:
    """One image as a script with diffusers alone would ask for it."""
    extra: dict[str, Any] = {}
    if loaded.family.max_sequence_length:
        extra["max_sequence_length"] = loaded.family.max_sequence_length
    return loaded.pipe(
        prompt=recipe.prompt,
        num_inference_steps=recipe.steps,
        guidance_scale=recipe.guidance,
        width=recipe.width,
        height=recipe.height,
        generator=torch.Generator("cpu").manual_seed(recipe.seed),
        **extra,
    )


def timed(run: Callable[[], object]) -> float:
    synchronize()
    started = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - started


def engine_and_bare(
    engine: Engine, loaded: LoadedModel, recipe: Recipe, repeats: int
) -> dict[str, float]:
    return interleaved(
        {
            "bare": lambda: bare_call(loaded, recipe),
            "engine": lambda: engine.txt2img(recipe),
            # The worker's critical path: it encodes the PNGs on CPU threads meanwhile.
            "unencoded": lambda: engine.txt2img(recipe, encode=False),
        },
        repeats,
    )


def option_figures(
    engine: Engine, loaded: LoadedModel, recipe: Recipe, repeats: int
) -> tuple[float, float, float]:
    """Seconds per image (median of ``repeats``), peak GiB, and one bare call's seconds.
    The engine's image is not encoded: a worker encodes it on CPU threads meanwhile."""
    engine.txt2img(recipe.model_copy(update={"steps": 1}))  # kernels, hooks, allocator
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(
        timed(lambda: engine.txt2img(recipe, encode=False)) for _ in range(repeats)
    )
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else 0.0
    return seconds, peak, timed(lambda: bare_call(loaded, recipe))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny-flux", help=f"{', '.join(ARCHS)} or a model")
    parser.add_argument("--side", type=int, default=0, help="image side (default: native)")
    parser.add_argument("--steps", type=int, default=None, help="of (a) (default: family's)")
    parser.add_argument("--option-steps", type=int, default=4, help="of each option in (b)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--option-repeats", type=int, default=2, help="timed calls per option")
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated")
    parser.add_argument(
        "--skip-overhead", action="store_true", help="leave out (a); build only the options'"
    )
    args = parser.parse_args()
    options = [name.strip() for name in args.options.split(",") if name.strip()]
    if not torch.cuda.is_available():
        options = [name for name in options if name == "none"]

    first = options[0] if args.skip_overhead and options else "none"
    loaded: LoadedModel | None = load(args, *OPTIONS[first])
    assert loaded is not None
    family = loaded.family
    side = args.side or family.native_side
    recipe = Recipe(
        model=args.arch,
        prompt="a lighthouse at dusk, oil on canvas",
        seed=7,
        width=side,
        height=side,
        steps=args.steps or family.default_steps,
        guidance=family.default_guidance,
        count=1,
    )
    print(
        f"{args.arch} ({family.name}) on {loaded.device} {loaded.dtype}, {side}x{side}, "
        f"{recipe.steps} steps, median of {args.repeats}; compile off",
        flush=True,
    )
    if not args.skip_overhead:
        times = engine_and_bare(Engine(loaded), loaded, recipe, args.repeats)
        print(
            f"(a) one image: engine {times['engine']:.3f}s / bare {times['bare']:.3f}s = "
            f"{times['engine'] / times['bare']:.3f}; engine {1 / times['engine']:.3f} img/s; "
            f"without the PNG (as a worker waits) {times['unencoded']:.3f}s = "
            f"{times['unencoded'] / times['bare']:.3f}",
            flush=True,
        )

    short = recipe.model_copy(update={"steps": args.option_steps})
    for name in options:
        offload, quantize = OPTIONS[name]
        if name != first or loaded is None:
            loaded = None  # the last option's weights go before the next's come
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                loaded = load(args, offload, quantize)
            except Exception as exc:  # a quantisation this GPU lacks: say so, go on
                print(f"(b) {name}: could not load: {type(exc).__name__}: {exc}", flush=True)
                continue
        seconds, peak, bare = option_figures(Engine(loaded), loaded, short, args.option_repeats)
        print(
            f"(b) {name:10s} (IMAGINE_OFFLOAD={offload}, IMAGINE_QUANTIZE={quantize}): "
            f"{seconds:.2f}s per image at {short.steps} steps ({1 / seconds:.3f} img/s), "
            f"peak {peak:.1f} GiB, engine / bare {seconds / bare:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
