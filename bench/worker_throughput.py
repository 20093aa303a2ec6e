"""A busy worker's images per second against a loop of bare diffusers calls, in one run.

A queue of 32 mixed jobs (grids of 4 from four users, two sizes, two styles and none,
in runs of four alike, as people reroll and restyle) goes through the real worker: an
embedded deployment on a fresh SQLite file, PNGs, thumbnails and grids stored. Prints
ratios measured in this run, never absolute targets:

  (a) batched worker / bare eager loop, images per second      (GPU target >= 1.6)
  (b) batched worker / the same worker at IMAGINE_MAX_BATCH=1   (CPU target >= 1.2)
      read against its ceiling: bare diffusers making IMAGINE_MAX_BATCH images in one
      call / in calls of one grid, the most any batching gains on this machine and size
  (c) one job's latency: engine grid of 4 / bare call           (GPU target <= 1.02)
  and the graphs compiled during the runs, after the warm-up    (target 0)

The queue runs ``--rounds`` times (default 2) in turn, every other round backwards, so a
shared machine's drift weighs on each run alike; the figures are their totals.

The bare loop is eager diffusers on a second copy of the model, styles switched with
``set_adapters``, one call per job in the same order. ``--arch sd15-full`` or
``sdxl-full`` builds full-size random-weight models on the device (no downloads);
``--compile auto`` compiles there as a worker would (auto: on with CUDA).

    python bench/worker_throughput.py                      # tiny model, CPU
    python bench/worker_throughput.py --arch sd15-full     # on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/worker_throughput.py`, like the others

from bench.engine_overhead import interleaved, write_styles  # noqa: E402
from bench.full_size import build_loaded  # noqa: E402
from bot.deployment import open_deployment  # noqa: E402
from generation.compiled import compiled_graphs, eager_runs, plan_compile  # noqa: E402
from generation.engine import Engine  # noqa: E402
from generation.loading import LoadedModel, load_model, pick_device, pick_dtype  # noqa: E402
from generation.styles import StyleRegistry  # noqa: E402
from generation.worker import Worker  # noqa: E402
from storage.events import JobFailed, JobSucceeded  # noqa: E402
from storage.families import size_for  # noqa: E402
from storage.models import GenerationKind  # noqa: E402
from storage.queue import Submission  # noqa: E402
from storage.recipe import Recipe, StyleRef  # noqa: E402
from storage.settings import Settings  # noqa: E402
from storage.slot_rank import configured_slots  # noqa: E402

JOBS = 32
USERS = 4
RUN = 4  # jobs in a row with the same settings
STYLES = ("first", "second")


@dataclass(frozen=True)
class Setup:
    settings: Settings
    engine: Engine
    bare: LoadedModel
    sizes: list[tuple[int, int]]
    steps: int


def mixed_jobs(setup: Setup) -> list[Recipe]:
    """The queue, in submission order (four users taking turns: the fair order too)."""
    (square, wide), guidance = setup.sizes, setup.engine.family.default_guidance
    settings = [
        (square, None),
        (square, "first"),
        (wide, "second"),
        (wide, None),
        (square, "second"),
    ]
    jobs = []
    for number in range(JOBS):
        (width, height), style = settings[number // RUN % len(settings)]
        jobs.append(
            Recipe(
                model=setup.settings.model,
                prompt=f"a lighthouse at dusk, study {number}",
                seed=1000 + 10 * number,
                width=width,
                height=height,
                steps=setup.steps,
                guidance=guidance,
                count=4,
                styles=() if style is None else (StyleRef(name=style, weight=0.8),),
            )
        )
    return jobs


def bare_call(loaded: LoadedModel, recipe: Recipe) -> object:
    """What a script with diffusers alone would do for this job."""
    pipe = loaded.pipe
    if recipe.styles:
        pipe.enable_lora()
        pipe.set_adapters([ref.name for ref in recipe.styles], [r.weight for r in recipe.styles])
    else:
        pipe.disable_lora()
    generators = [
        torch.Generator("cpu").manual_seed(recipe.seed_for(i)) for i in range(recipe.count)
    ]
    return pipe(
        prompt=recipe.prompt,
        num_images_per_prompt=recipe.count,
        num_inference_steps=recipe.steps,
        guidance_scale=recipe.guidance,
        width=recipe.width,
        height=recipe.height,
        generator=generators,
    )


@dataclass(frozen=True)
class Took:
    seconds: float
    cpu_seconds: float  # this process's CPU time: steadier than seconds on a shared CPU
    busy_seconds: float = 0.0  # the engine's time in its pipelines (Engine.busy_seconds)

    def __add__(self, other: Took) -> Took:
        return Took(
            self.seconds + other.seconds,
            self.cpu_seconds + other.cpu_seconds,
            self.busy_seconds + other.busy_seconds,
        )


class Clock:
    def __init__(self) -> None:
        synchronize()
        self.started = time.perf_counter(), time.process_time()

    def took(self) -> Took:
        synchronize()
        wall, cpu = self.started
        return Took(time.perf_counter() - wall, time.process_time() - cpu)


def batching_ceiling(setup: Setup, grid: Recipe, images: int, repeats: int) -> tuple[float, int]:
    """Seconds of bare diffusers making ``images`` images in calls of one ``grid`` each,
    over the seconds of one call making them all; and the number of calls. Batching saves
    only what a call costs beyond its images' work, so no worker gains more than this."""
    calls = max(1, images // grid.count)
    together = grid.model_copy(update={"count": calls * grid.count})
    seconds = interleaved(
        {
            "grids": lambda: [bare_call(setup.bare, grid) for _ in range(calls)],
            "one call": lambda: bare_call(setup.bare, together),
        },
        repeats,
    )
    return seconds["grids"] / seconds["one call"], calls


def bare_loop(setup: Setup, jobs: list[Recipe]) -> Took:
    clock = Clock()
    for recipe in jobs:
        bare_call(setup.bare, recipe)
    return clock.took()


async def worker_run(setup: Setup, jobs: list[Recipe], max_batch: int, folder: Path) -> Took:
    """Seconds the real worker takes for ``jobs``, queued before it starts."""
    settings = setup.settings.model_copy(
        update={
            "data_dir": folder,
            "database_url": None,
            "max_batch": max_batch,
            "max_queued_per_user": JOBS,
        }
    )
    setup.engine.max_batch = max_batch
    async with open_deployment(settings) as deployment:
        for number, recipe in enumerate(jobs):
            submission = Submission(GenerationKind.IMAGINE, recipe, 1 + number % USERS)
            await deployment.queue.submit(submission)
        finished = 0
        done = asyncio.Event()

        async def count(events: Any) -> None:
            nonlocal finished
            async for event in events.subscribe():
                if isinstance(event, JobFailed):
                    raise RuntimeError(f"a job failed: {event.error}")
                if isinstance(event, JobSucceeded):
                    finished += 1
                    if finished == len(jobs):
                        done.set()

        listener = asyncio.create_task(count(deployment.events))
        await asyncio.sleep(0)
        worker = Worker.for_deployment(deployment, setup.engine, name="bench")
        stop = asyncio.Event()
        busy = setup.engine.busy_seconds
        clock = Clock()
        running = asyncio.create_task(worker.run(stop))
        waiting = asyncio.create_task(done.wait())
        await asyncio.wait({waiting, running, listener}, return_when=asyncio.FIRST_COMPLETED)
        took = replace(clock.took(), busy_seconds=setup.engine.busy_seconds - busy)
        stop.set()
        await running
        listener.cancel()
        if not done.is_set():
            raise RuntimeError(f"only {finished} of {len(jobs)} jobs finished")
        return took


def alternating(
    phases: dict[str, Callable[[Path], Took]], rounds: int, work: Path
) -> dict[str, Took]:
    """Each phase's total over ``rounds``, run in turn and every other round backwards
    (A B C, C B A, ...): a machine that slows down or speeds up during the run (a shared
    CPU does) weighs on every phase alike, where one round would charge it to the last."""
    total = {name: Took(0.0, 0.0) for name in phases}
    names = list(phases)
    for number in range(rounds):
        for name in names if number % 2 == 0 else names[::-1]:
            total[name] += phases[name](work / f"{name.replace(' ', '-')}-{number}")
    return total


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(args: argparse.Namespace, work: Path) -> Setup:
    settings = Settings(
        data_dir=work,
        model=args.model or args.arch,
        styles_dir=work / "styles",
        compile=args.compile,
        **({"max_batch": args.max_batch} if args.max_batch else {}),
    )
    built = args.model is None and args.arch != "tiny"  # full size: built on the device

    def loaded_model() -> LoadedModel:
        if not built:
            return load_model(settings)
        device = pick_device(settings.device)
        return build_loaded(args.arch, device, pick_dtype(settings.dtype, device))

    loaded = loaded_model()
    family = loaded.family
    bare = loaded_model()
    # Written from the bare model, which loads them anyway: making a LoRA leaves its
    # layers wrapped, and the engine's model stays as a worker loads it.
    write_styles(bare.pipe.unet, work / "styles", family.name, {name: 4 for name in STYLES})
    registry = StyleRegistry.from_folder(work / "styles")
    engine = Engine(
        loaded,
        styles=registry,
        compile_plan=plan_compile(args.compile, loaded.device),
        # As a worker sizes its style slots at start: rank 8 for these rank-4 styles.
        lora_slot_rank=configured_slots(settings, registry.lora_ranks()),
        max_batch=settings.max_batch,
        lora_folder=work / "lora-cache",
    )
    for name in STYLES:
        bare.pipe.load_lora_weights(str(registry.get(name).lora_path), adapter_name=name)
    sizes = [size_for(None, family), size_for((3, 2), family)]
    if args.side:  # a quick check of the full-size code path on a CPU
        sizes = [(args.side, args.side), (args.side * 3 // 2 // 8 * 8, args.side)]
    steps = args.steps or (4 if args.arch == "tiny" else 20)
    return Setup(settings, engine, bare, sizes, steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "sd15-full", "sdxl-full"], default="tiny")
    parser.add_argument("--model", help="a model to load instead of --arch")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="of the single-job latency")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="of the queue runs, in turn and every other round backwards (1 on a GPU saves time)",
    )
    parser.add_argument("--side", type=int, default=0, help="square size instead of the native")
    parser.add_argument(
        "--skip-one-at-a-time",
        action="store_true",
        help="leave out the IMAGINE_MAX_BATCH=1 run (ratio b), to save GPU time",
    )
    parser.add_argument(
        "--max-batch", type=int, default=None, help="IMAGINE_MAX_BATCH (default: the setting's)"
    )
    parser.add_argument(
        "--latency-count",
        type=int,
        default=0,
        help="images of (c)'s job (default 4, a grid); IMAGINE_MAX_BATCH's needs no more compiling",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("generation.engine", "generation.compiled"):  # the warm-up's steps
        logging.getLogger(name).setLevel(logging.INFO)

    work = Path(tempfile.mkdtemp(prefix="imagine-bench-"))
    setup = build(args, work)
    engine, loaded = setup.engine, setup.engine.loaded
    max_batch = setup.settings.max_batch
    jobs = mixed_jobs(setup)
    images = sum(recipe.count for recipe in jobs)
    print(
        f"model {setup.settings.model} ({engine.family.name}) on {loaded.device} "
        f"{loaded.dtype}, sizes {setup.sizes}, {setup.steps} steps; {JOBS} jobs, {images} "
        f"images; compile {engine.compile_plan.reason}",
        flush=True,
    )
    # What this queue runs: batches of IMAGINE_MAX_BATCH at both sizes, styled or not, and
    # the single grid of (c); IMAGINE_COMPILE_SIZES does the same for a worker's ratios.
    single = jobs[0].model_copy(update={"count": args.latency_count or jobs[0].count})
    warm_up = engine.warm_up(sizes=setup.sizes, count=max_batch)
    if max_batch != single.count:
        warm_up += engine.warm_up(sizes=setup.sizes[:1], count=single.count, styled=False)
    for recipe in jobs[:: RUN * 2][:3]:  # the bare model's kernels and styles, once
        bare_call(setup.bare, recipe)
    print(f"engine warm-up {warm_up:.1f}s", flush=True)

    graphs, eager = compiled_graphs(), eager_runs()
    phases: dict[str, Callable[[Path], Took]] = {
        "batched": lambda folder: asyncio.run(worker_run(setup, jobs, max_batch, folder)),
        "bare": lambda _: bare_loop(setup, jobs),
    }
    if not args.skip_one_at_a_time:
        phases["one by one"] = lambda folder: asyncio.run(worker_run(setup, jobs, 1, folder))
    took = alternating(phases, args.rounds, work)
    batched, bare, one_by_one = took["batched"], took["bare"], took.get("one by one")
    recompiled = compiled_graphs() - graphs

    def rate(took: Took) -> str:
        busy = ""
        if took.busy_seconds:  # a worker's run: how much of it the engine was busy
            busy = f"; engine busy {took.busy_seconds / took.seconds:.0%} of the wall time"
        return (
            f"{images * args.rounds / took.seconds:.2f} img/s ({took.seconds:.1f}s; "
            f"{images * args.rounds / took.cpu_seconds:.2f} img per CPU second{busy})"
        )

    def ratio(faster: Took, slower: Took) -> str:
        return (
            f"{slower.seconds / faster.seconds:.3f} "
            f"(by CPU time {slower.cpu_seconds / faster.cpu_seconds:.3f})"
        )

    print(f"batched worker (IMAGINE_MAX_BATCH={max_batch}): {rate(batched)}")
    print(f"bare eager diffusers loop: {rate(bare)}")
    print(f"(a) batched worker / bare loop = {ratio(batched, bare)} (GPU target >= 1.6)")
    if one_by_one is not None:
        print(f"worker one job at a time (IMAGINE_MAX_BATCH=1): {rate(one_by_one)}")
        print(
            f"(b) batched / one-at-a-time worker = {ratio(batched, one_by_one)} (CPU target >= 1.2)"
        )
        print(f"    one-at-a-time worker / bare loop = {ratio(one_by_one, bare)}")
        ceiling, calls = batching_ceiling(setup, jobs[0], max_batch, args.repeats)
        print(
            f"    (b)'s ceiling: bare diffusers, {calls * jobs[0].count} images in {calls} "
            f"calls of {jobs[0].count} / in one call = {ceiling:.3f} (median of "
            f"{args.repeats}): the most batching can gain at {setup.sizes[0]} here"
        )

    setup.engine.max_batch = max_batch
    latency = interleaved(
        {
            "bare": lambda: bare_call(setup.bare, single),
            "engine": lambda: engine.txt2img(single),
        },
        args.repeats,
    )
    print(
        f"(c) one job of {single.count} images: engine {latency['engine']:.3f}s / bare "
        f"{latency['bare']:.3f}s = "
        f"{latency['engine'] / latency['bare']:.3f} (GPU target <= 1.02; median of "
        f"{args.repeats})"
    )
    print(
        f"graphs compiled during the runs, after the warm-up: {recompiled} (target 0); "
        f"calls run uncompiled, their shape not warmed up: {eager_runs() - eager}"
    )
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
