"""Queue throughput and fairness on PostgreSQL (procrastinate) with a no-op engine.

Prints, measured in one run on a fresh database, through the scaled queue that
``imagine worker`` uses (rows carried by procrastinate jobs):
  - the fairness scenario (user A queues 10 jobs, then user B 1) as a timeline,
  - the cost of one procrastinate fetch as a ratio of a bare one-row UPDATE
    round trip measured in the same run,
  - jobs per second from submit to start with W workers, and p50 / p99 of that
    latency,
  - the worker's own bookkeeping per job: ``imagine worker``'s Worker, on the
    scaled deployment's ports, running pre-queued jobs on an engine that returns
    one 8x8 image at once. Its time per job (between two engine calls, median)
    minus one bare procrastinate fetch is the bookkeeping (target: at most 5 ms),
    in wall time and in this process's CPU time (steadier on a busy machine), with
    the round trips one job costs: the worker's statements, NOTIFYs and
    procrastinate's queries.

    python bench/queue_throughput.py [--url postgresql+asyncpg://postgres@127.0.0.1/postgres]
        [--only bookkeeping]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, cast

import asyncpg
from procrastinate.jobs import Status
from sqlalchemy import text
from sqlalchemy.engine import URL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/queue_throughput.py`, like the others

from bench.round_trips import RoundTrips  # noqa: E402
from generation.engine import GeneratedImage  # noqa: E402
from generation.styles import StyleRegistry  # noqa: E402
from generation.worker import Worker  # noqa: E402
from migrations import runner  # noqa: E402
from storage.database import Database, parse_database_url  # noqa: E402
from storage.deployment import Deployment  # noqa: E402
from storage.events import LocalEventBus  # noqa: E402
from storage.generations import transition  # noqa: E402
from storage.models import GenerationKind, GenerationStatus  # noqa: E402
from storage.queue import Cancellations, Submission  # noqa: E402
from storage.recipe import Recipe  # noqa: E402
from storage.scaled_queue import (  # noqa: E402
    TASK,
    ProcrastinateQueue,
    advance_turns,
    make_app,
    queue_name,
)
from storage.scheduling import Limits  # noqa: E402

RECIPE = Recipe(model="noop", prompt="p", seed=1, width=64, height=64, steps=1, guidance=1)
S = GenerationStatus


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class NoopWorkers:
    """procrastinate workers whose job is only the row's bookkeeping."""

    def __init__(self, queue: ProcrastinateQueue) -> None:
        self.queue = queue
        self.started: dict[int, float] = {}
        self.order: list[str] = []
        queue.app.task(name=TASK, pass_context=False)(self.run)

    async def run(self, generation_id: int) -> None:
        self.started[generation_id] = time.perf_counter()
        async with self.queue.database.session() as session:
            generation = await transition(session, generation_id, S.RUNNING, worker_name="w")
            await advance_turns(session, queue_name(generation.model), generation.requester_id)
        self.order.append(generation.recipe.prompt)
        async with self.queue.database.session() as session:
            await transition(session, generation_id, S.SUCCEEDED)

    async def until(self, count: int, workers: int) -> None:
        tasks = [
            asyncio.create_task(
                self.queue.app.run_worker_async(
                    queues=[queue_name(RECIPE.model)],
                    concurrency=1,
                    name=f"w{n}",
                    wait=True,
                    install_signal_handlers=False,
                    fetch_job_polling_interval=0.5,
                )
            )
            for n in range(workers)
        ]
        while len(self.started) < count:  # noqa: ASYNC110 - polled by design
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def fairness(queue: ProcrastinateQueue) -> None:
    for number in range(10):
        recipe = RECIPE.model_copy(update={"prompt": f"A{number}"})
        await queue.submit(Submission(GenerationKind.IMAGINE, recipe, 1))
    await queue.submit(
        Submission(GenerationKind.IMAGINE, RECIPE.model_copy(update={"prompt": "B0"}), 2)
    )
    workers = NoopWorkers(queue)
    await workers.until(11, workers=1)
    print("fairness (A queues 10, then B 1), run order: " + " ".join(workers.order))
    print(f"B's job ran #{workers.order.index('B0') + 1} (target: 2)")


async def fetch_cost_ratio(queue: ProcrastinateQueue, samples: int = 200) -> None:
    fetches, updates = [], []
    manager: Any = queue.app.job_manager
    worker_id = await manager.register_worker()
    for number in range(samples):
        generation = await queue.submit(Submission(GenerationKind.IMAGINE, RECIPE, 10_000 + number))
        began = time.perf_counter()
        job = await manager.fetch_job([queue_name(RECIPE.model)], worker_id)
        fetches.append(time.perf_counter() - began)
        assert job is not None
        async with queue.database.session() as session:
            began = time.perf_counter()
            await session.execute(
                text("UPDATE generations SET priority = priority WHERE id = :id"),
                {"id": generation.id},
            )
            updates.append(time.perf_counter() - began)
            await transition(session, generation.id, S.CANCELLED)
        await manager.finish_job(job, status=Status.SUCCEEDED, delete_job=False)
    await manager.unregister_worker(worker_id)
    fetch, update = statistics.median(fetches), statistics.median(updates)
    print(
        f"procrastinate fetch {fetch * 1000:.2f} ms vs bare one-row UPDATE {update * 1000:.2f} ms "
        f"= {fetch / update:.1f}x (median of {samples})"
    )


async def throughput(queue: ProcrastinateQueue, jobs: int, workers: int, users: int) -> None:
    submitted: dict[int, float] = {}
    runner_ = NoopWorkers(queue)
    started = time.perf_counter()
    running = asyncio.create_task(runner_.until(jobs, workers))

    async def submitter(numbers: range) -> None:  # as many bots/users submitting at once
        for number in numbers:
            began = time.perf_counter()
            generation = await queue.submit(
                Submission(GenerationKind.IMAGINE, RECIPE, requester_id=number % users)
            )
            submitted[generation.id] = began

    await asyncio.gather(*(submitter(range(n, jobs, 8)) for n in range(8)))
    await running
    seconds = time.perf_counter() - started
    latencies = [runner_.started[i] - submitted[i] for i in submitted if i in runner_.started]
    print(
        f"{jobs} jobs, {workers} workers, {users} users: {jobs / seconds:.1f} jobs/s "
        f"submit-to-start; latency p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms"
    )


class NoopEngine:
    """What the worker needs of an engine, answering at once with 8x8 images: one, or
    with ``grids`` the recipe's count (then the worker composes a grid of them)."""

    def __init__(self, model_id: str = "noop-bookkeeping", *, grids: bool = False) -> None:
        from PIL import Image as PILImage

        self.model_id = model_id
        self.grids = grids
        self.styles = StyleRegistry()
        self.calls: list[float] = []
        self.counted: Counted | None = None
        self.cpu: list[float] = []  # this process's CPU time at each call, all threads
        self.image = PILImage.new("RGB", (8, 8), (200, 120, 40))
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        self.png = buffer.getvalue()

    def txt2img(self, recipe: Recipe, **_: Any) -> list[GeneratedImage]:
        self.calls.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if self.counted is not None:
            self.counted.mark()
        return self._images(recipe)

    def txt2img_batch(self, recipes: Any, **_: Any) -> list[list[GeneratedImage]]:
        """A batch is one engine call, as on the real engine."""
        images = self.txt2img(recipes[0])
        return [images] + [self._images(recipe) for recipe in recipes[1:]]

    def _images(self, recipe: Recipe) -> list[GeneratedImage]:
        seed = recipe.seed or 0
        count = recipe.count if self.grids else 1
        return [GeneratedImage(n, seed + n, self.image, self.png, recipe) for n in range(count)]

    def img2img(self, recipe: Recipe, source: Any, **_: Any) -> list[GeneratedImage]:
        return self.txt2img(recipe)

    def upscale(self, recipe: Recipe, source: Any, **_: Any) -> GeneratedImage:
        return self.txt2img(recipe)[0]

    def complete_recipe(self, recipe: Recipe) -> Recipe:
        return recipe

    def a1111_sampler(self, sampler: str) -> str:
        return "Euler"


async def bare_fetch(deployment: Deployment, samples: int) -> tuple[float, float]:
    """A bare procrastinate fetch of a waiting job (the job then finished, unrun): median
    wall and CPU milliseconds."""
    queue: Any = deployment.queue
    manager: Any = queue.app.job_manager
    recipe = RECIPE.model_copy(update={"model": "noop-fetch"})
    worker_id = await manager.register_worker()
    walls, cpus = [], []
    for number in range(samples):
        generation = await queue.submit(Submission(GenerationKind.IMAGINE, recipe, number % 50))
        began, cpu = time.perf_counter(), time.process_time()
        job = await manager.fetch_job([queue_name(recipe.model)], worker_id)
        walls.append(time.perf_counter() - began)
        cpus.append(time.process_time() - cpu)
        assert job is not None
        await manager.finish_job(job, status=Status.SUCCEEDED, delete_job=False)
        async with queue.database.session() as session:
            await transition(session, generation.id, S.CANCELLED)
    await manager.unregister_worker(worker_id)
    return statistics.median(walls) * 1000, statistics.mean(cpus) * 1000


class Counted:
    """Counters read at each engine call: what the worker sent between two calls is what
    one job's bookkeeping sent (its result, the next job's claim)."""

    def __init__(self, deployment: Deployment, round_trips: RoundTrips) -> None:
        self.round_trips = round_trips
        self.pool: Any = cast(Any, deployment.queue).app.connector.pool
        self.notifies = 0
        bus: Any = deployment.events
        publish = bus.publish

        def counted(event: Any) -> None:  # each is one NOTIFY on the bus's own connection
            self.notifies += 1
            publish(event)

        bus.publish = counted
        self.marks: list[tuple[int, int, int]] = []

    def mark(self) -> None:
        requests = self.pool.get_stats().get("requests_num", 0)
        self.marks.append((self.round_trips.count, self.notifies, requests))

    def per_job(self) -> tuple[float, float, float]:
        """Median statements of ours, NOTIFYs, procrastinate queries between two calls."""
        gaps = [
            [b - a for a, b in zip(one, two, strict=True)]
            for one, two in zip(self.marks, self.marks[1:], strict=False)
        ]
        return cast(
            tuple[float, float, float],
            tuple(statistics.median(gap[n] for gap in gaps) for n in range(3)),
        )


async def bookkeeping(url: URL, jobs: int = 300) -> None:
    from bot.deployment import open_deployment
    from storage.settings import Settings

    settings = Settings(
        database_url=url.render_as_string(hide_password=False),
        max_running_per_user=1,
        max_queued_per_user=100_000,
        model="noop-bookkeeping",
        # One job per engine call: the bookkeeping of a job on its own (a batch shares
        # some of it; looking for batch-mates costs a round trip more per batch).
        max_batch=1,
    )
    async with open_deployment(settings) as deployment:
        fetch, fetch_cpu = await bare_fetch(deployment, 200)
        engine = NoopEngine()
        recipe = RECIPE.model_copy(update={"model": engine.model_id})
        for number in range(jobs):
            await deployment.queue.submit(Submission(GenerationKind.IMAGINE, recipe, number % 50))
        worker = Worker.for_deployment(deployment, cast(Any, engine), name="bench-worker")
        stop = asyncio.Event()
        with RoundTrips(deployment.database.engine) as round_trips:
            engine.counted = Counted(deployment, round_trips)
            running = asyncio.create_task(worker.run(stop))
            while len(engine.calls) < jobs and not running.done():  # noqa: ASYNC110 - polled
                await asyncio.sleep(0.05)
            stop.set()
            await running
    gaps = [(b - a) * 1000 for a, b in zip(engine.calls, engine.calls[1:], strict=False)]
    per_job = statistics.median(gaps)
    cpu = (engine.cpu[-1] - engine.cpu[0]) * 1000 / (len(engine.cpu) - 1)
    ours, notifies, requests = engine.counted.per_job()
    wall_cost, cpu_cost = per_job - fetch, cpu - fetch_cpu

    def verdict(ms: float) -> str:
        return "met" if ms <= 5 else "not met"

    print(
        f"worker bookkeeping ({jobs} jobs, no-op engine, scaled mode):\n"
        f"  bare procrastinate fetch: {fetch:.2f} ms wall (median), {fetch_cpu:.2f} ms CPU\n"
        f"  worker, engine call to engine call: {per_job:.2f} ms wall (median; p90 "
        f"{percentile(gaps, 0.9):.2f}), {cpu:.2f} ms CPU of this process (mean)\n"
        f"  bookkeeping = worker - fetch: {wall_cost:.2f} ms wall, {cpu_cost:.2f} ms CPU; "
        f"target <= 5 ms: {verdict(wall_cost)} (wall), {verdict(cpu_cost)} (CPU); "
        f"worker/fetch {per_job / fetch:.1f}x wall\n"
        f"  round trips per job: {ours:.0f} of the worker's own through SQLAlchemy, "
        f"{notifies:.0f} NOTIFY (off the job's path), {requests:.0f} procrastinate queries "
        f"(fetch, finish; its pool checks a connection with a query only when the server "
        f"may have closed it) = {ours + notifies + requests:.0f}"
    )


def scaled_queue(database: Database, limits: Limits, app: Any) -> ProcrastinateQueue:
    return ProcrastinateQueue(database, limits, app, LocalEventBus(), Cancellations())


async def main(admin_url: URL, only: str | None) -> int:
    name = f"imagine_bench_{uuid.uuid4().hex[:8]}"
    dsn = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    await connection.execute(f'CREATE DATABASE "{name}"')
    database = Database(admin_url.set(database=name), pool_size=20)
    try:
        await runner.upgrade(database)
        limits = Limits(max_running_per_user=1, max_queued_per_user=100000)
        if only is None:
            for step in (fairness, fetch_cost_ratio):
                app = make_app(database.url)
                async with app.open_async():
                    await step(scaled_queue(database, limits, app))
            for jobs, workers in ((500, 1), (2000, 8)):
                app = make_app(database.url)
                async with app.open_async():
                    await throughput(scaled_queue(database, limits, app), jobs, workers, 50)
        await bookkeeping(database.url)
    finally:
        await database.dispose()
        await connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await connection.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--only", choices=["bookkeeping"], help="run only this part")
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(parse_database_url(arguments.url), arguments.only)))
