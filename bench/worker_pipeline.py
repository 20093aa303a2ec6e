"""How long the engine waits between jobs: each job stored before the next (the old
worker) against stored in the background while the engine runs the next one.

One process, one engine, a fresh SQLite database and blob folder per run, the real
:class:`~generation.worker.Worker` on the row queue; runs of both kinds interleaved.
The engine's idle time is the gap between the end of one engine call and the start
of the next (what a GPU would spend waiting for the CPU), per job, median over runs.

    PYTHONPATH=. python bench/worker_pipeline.py [--jobs 6] [--size 384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url

from generation.engine import Engine
from generation.worker import Worker
from migrations import runner
from storage.blobs import LocalBlobStore
from storage.database import Database
from storage.events import LocalEventBus
from storage.models import Generation, GenerationKind
from storage.queue import Cancellations, RowJobs, RowQueue, Submission
from storage.recipe import Recipe
from storage.scheduling import Limits
from storage.settings import Settings

LIMITS = Limits(max_running_per_user=1, max_queued_per_user=100)


class TimedEngine:
    """The engine, with when each of its calls started and ended."""

    def __init__(self, engine: Engine, jobs: int, stop: asyncio.Event) -> None:
        self.engine = engine
        self.calls: list[tuple[float, float]] = []
        self.jobs, self.stop = jobs, stop
        self.loop = asyncio.get_running_loop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def txt2img(self, recipe: Recipe, **options: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.engine.txt2img(recipe, **options)
        finally:
            self.calls.append((started, time.perf_counter()))
            if len(self.calls) == self.jobs:  # the worker stops once their images are stored
                self.loop.call_soon_threadsafe(self.stop.set)


async def one_run(
    engine: Engine, folder: Path, jobs: int, size: int, max_finishing: int
) -> tuple[float, float]:
    """(engine idle seconds per job, seconds for all jobs) with ``max_finishing``."""
    database = Database(make_url(f"sqlite+aiosqlite:///{folder / 'imagine.db'}"))
    await runner.upgrade(database)
    stop = asyncio.Event()
    timed = TimedEngine(engine, jobs, stop)
    queue = RowQueue(database, LIMITS)
    worker = Worker(
        database,
        LocalBlobStore(folder / "blobs"),
        timed,  # type: ignore[arg-type]  # the engine, timed
        jobs=RowJobs(database, LIMITS, wakeup=queue.wakeup),
        events=LocalEventBus(),
        cancellations=Cancellations(),
        max_finishing=max_finishing,
    )
    for number in range(jobs):  # one user each: no per-user limit holds a job back
        recipe = Recipe(
            model="tiny",
            prompt=f"a lighthouse at dusk, number {number}",
            seed=number,
            width=size,
            height=size,
            steps=2,
            guidance=5.0,
            count=4,
        )
        await queue.submit(Submission(GenerationKind.IMAGINE, recipe, requester_id=number + 1))
    started = time.perf_counter()
    await worker.run(stop)
    async with database.session() as session:
        failed = list(
            await session.scalars(select(Generation.error).where(Generation.error.is_not(None)))
        )
    if failed:
        raise SystemExit(f"jobs failed: {failed}")
    seconds = time.perf_counter() - started
    await database.dispose()
    gaps = [
        later[0] - earlier[1] for earlier, later in zip(timed.calls, timed.calls[1:], strict=False)
    ]
    return statistics.mean(gaps), seconds


async def main_async(jobs: int, size: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        (root / "styles").mkdir()
        engine = Engine.from_settings(Settings(data_dir=root, model="tiny", device="cpu"))
        engine.warm_up()
        results: dict[int, list[tuple[float, float]]] = {0: [], 2: []}
        for repeat in range(repeats):
            for max_finishing in results:
                folder = root / f"run-{repeat}-{max_finishing}"
                folder.mkdir()
                results[max_finishing].append(
                    await one_run(engine, folder, jobs, size, max_finishing)
                )
    idle = {key: statistics.median(gap for gap, _ in runs) for key, runs in results.items()}
    wall = {key: statistics.median(total for _, total in runs) for key, runs in results.items()}
    print(
        f"{jobs} jobs of 4 images {size}x{size}, 2 steps, tiny model on the CPU, "
        f"median of {repeats}:"
    )
    print(
        f"  engine idle between jobs: stored before the next {idle[0] * 1000:.1f} ms, "
        f"in the background {idle[2] * 1000:.1f} ms "
        f"(background / before = {idle[2] / idle[0]:.2f})"
    )
    print(
        f"  all jobs: {wall[0]:.2f} s before, {wall[2]:.2f} s background "
        f"(throughput ×{wall[0] / wall[2]:.2f})"
    )


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main_async(args.jobs, args.size, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
