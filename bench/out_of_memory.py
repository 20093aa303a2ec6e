"""An oversized request on a real GPU: retried one image at a time, else a sentence.

The card is made smaller than it is (``torch.cuda.set_per_process_memory_fraction``), so
a full-size model runs out of memory at sizes a person may ask for. Three jobs go through
the engine in turn, and the script prints what became of each:

  1. a grid of 4 at ``--side`` under ``--cap-gib``
  2. the same under ``--small-cap-gib``
  3. an ordinary grid under ``--cap-gib``, as the next job on a worker

Each oversized job must end "fitted one at a time" (the batch ran out, the retry at batch
1 fitted) or "refused" (the engine's sentence naming the size); the ordinary one must
fit afterwards. Exits 1 otherwise. (On an H200 with SD 1.5 at 2048², one image's VAE
decode alone needs more than 10 GiB, so both oversized jobs are refused.) On a machine
without CUDA it says so and exits 0 (the CPU tests inject the error: ``IMAGINE_TEST_FAULT``).

    python bench/out_of_memory.py --arch sd15-full --side 2048
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/out_of_memory.py`, like the others

from bench.full_size import ARCHS, build_loaded  # noqa: E402
from generation.engine import Engine, OutOfMemory  # noqa: E402
from storage.recipe import Recipe  # noqa: E402

GIB = 2**30


class Retries(logging.Handler):
    """Counts the engine's "one at a time now" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def attempt(engine: Engine, recipe: Recipe, cap_gib: float, retries: Retries) -> str:
    """``"fitted"``, ``"fitted one at a time"`` or ``"refused"``, printed with details."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = len(retries.messages)
    started = time.perf_counter()
    try:
        images = engine.txt2img(recipe)
        outcome = "fitted" if len(retries.messages) == before else "fitted one at a time"
        detail = f"{len(images)} images"
    except OutOfMemory as exc:
        outcome, detail = "refused", f"sentence: {exc}"
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / GIB
    print(
        f"{recipe.width}x{recipe.height} x {recipe.count} under {cap_gib:g} GiB: {outcome} "
        f"in {seconds:.1f}s, peak {peak:.1f} GiB; {detail}",
        flush=True,
    )
    for message in retries.messages[before:]:
        print(f"    engine log: {message[:160]}", flush=True)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=list(ARCHS), default="sd15-full")
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--cap-gib", type=float, default=10.0)
    parser.add_argument("--small-cap-gib", type=float, default=3.5)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to run out of (the CPU tests inject the error)")
        return 0

    retries = Retries()
    logging.getLogger("generation.engine").addHandler(retries)
    loaded = build_loaded(args.arch, torch.device("cuda"), torch.bfloat16)
    engine = Engine(loaded)
    weights = torch.cuda.memory_allocated() / GIB
    print(f"{args.arch} on {torch.cuda.get_device_name(0)}, weights {weights:.1f} GiB", flush=True)
    family = loaded.family
    big = Recipe(
        model=args.arch,
        prompt="a lighthouse at dusk",
        seed=7,
        width=args.side,
        height=args.side,
        steps=args.steps,
        guidance=family.default_guidance,
        count=4,
    )
    native = family.native_side
    ordinary = big.model_copy(update={"width": native, "height": native, "steps": 4})
    outcomes = [
        attempt(engine, big, args.cap_gib, retries),
        attempt(engine, big, args.small_cap_gib, retries),
        attempt(engine, ordinary, args.cap_gib, retries),
    ]
    oversized_ok = all(each in ("fitted one at a time", "refused") for each in outcomes[:2])
    print(f"outcomes {outcomes}")
    return 0 if oversized_ok and outcomes[2] == "fitted" else 1


if __name__ == "__main__":
    sys.exit(main())
