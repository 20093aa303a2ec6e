"""Queue throughput and fairness on PostgreSQL with a no-op engine.

Prints, measured in one run on a fresh database:
  - jobs per second from submit to claim with W concurrent workers,
  - p50 / p99 claim latency (submit → claimed), and the claim's cost as a ratio
    of a bare one-row UPDATE round trip measured in the same run,
  - the fairness scenario (user A queues 10 jobs, then user B 1) as a timeline.

    python bench/queue_throughput.py [--url postgresql+asyncpg://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import URL

from migrations import runner
from storage.database import Database, parse_database_url
from storage.generations import transition
from storage.models import GenerationKind, GenerationStatus
from storage.queue import EmbeddedQueue, Submission
from storage.recipe import Recipe
from storage.scheduling import Limits, claim_next

RECIPE = Recipe(model="noop", prompt="p", seed=1, width=64, height=64, steps=1, guidance=1)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def throughput(queue: EmbeddedQueue, jobs: int, workers: int, users: int) -> None:
    submitted: dict[int, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()

    async def worker(name: str) -> None:
        while not done.is_set():
            async with queue.database.session() as session:
                generation = await claim_next(session, name, queue.limits)
                if generation is not None:
                    latencies.append(time.perf_counter() - submitted[generation.id])
                    await transition(session, generation.id, GenerationStatus.SUCCEEDED)
            if generation is None:
                await asyncio.sleep(0.001)
            if len(latencies) == jobs:
                done.set()

    started = time.perf_counter()
    tasks = [asyncio.create_task(worker(f"w{n}")) for n in range(workers)]
    for number in range(jobs):
        generation = await queue.submit(
            Submission(GenerationKind.IMAGINE, RECIPE, requester_id=number % users)
        )
        submitted[generation.id] = time.perf_counter()
    await done.wait()
    seconds = time.perf_counter() - started
    await asyncio.gather(*tasks)
    print(
        f"{jobs} jobs, {workers} workers, {users} users: {jobs / seconds:.1f} jobs/s "
        f"submit-to-claim; claim latency p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms"
    )


async def claim_cost_ratio(queue: EmbeddedQueue, samples: int = 200) -> None:
    claims, updates = [], []
    for _ in range(samples):
        generation = await queue.submit(Submission(GenerationKind.IMAGINE, RECIPE, 999))
        async with queue.database.session() as session:
            began = time.perf_counter()
            await claim_next(session, "w", Limits(1000, 100000))
            claims.append(time.perf_counter() - began)
            began = time.perf_counter()
            await session.execute(
                text("UPDATE generations SET priority = priority WHERE id = :id"),
                {"id": generation.id},
            )
            updates.append(time.perf_counter() - began)
            await transition(session, generation.id, GenerationStatus.SUCCEEDED)
    claim, update = statistics.median(claims), statistics.median(updates)
    print(
        f"claim {claim * 1000:.2f} ms vs bare one-row UPDATE {update * 1000:.2f} ms "
        f"= {claim / update:.1f}x (median of {samples})"
    )


async def fairness(queue: EmbeddedQueue) -> None:
    for number in range(10):
        await queue.submit(
            Submission(
                GenerationKind.IMAGINE, RECIPE.model_copy(update={"prompt": f"A{number}"}), 1
            )
        )
    await queue.submit(
        Submission(GenerationKind.IMAGINE, RECIPE.model_copy(update={"prompt": "B0"}), 2)
    )
    timeline = []
    while True:
        async with queue.database.session() as session:
            generation = await claim_next(session, "w", queue.limits)
            if generation is None:
                break
            timeline.append(generation.recipe.prompt)
            await transition(session, generation.id, GenerationStatus.SUCCEEDED)
    print("fairness (A queues 10, then B 1), run order: " + " ".join(timeline))
    print(f"B's job ran #{timeline.index('B0') + 1} (target: 2)")


async def main(admin_url: URL) -> int:
    name = f"imagine_bench_{uuid.uuid4().hex[:8]}"
    dsn = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    await connection.execute(f'CREATE DATABASE "{name}"')
    database = Database(admin_url.set(database=name), pool_size=20)
    try:
        await runner.upgrade(database)
        queue = EmbeddedQueue(database, Limits(max_running_per_user=1, max_queued_per_user=100000))
        await fairness(queue)
        await claim_cost_ratio(queue)
        await throughput(queue, jobs=500, workers=1, users=50)
        await throughput(queue, jobs=2000, workers=8, users=50)
    finally:
        await database.dispose()
        await connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await connection.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    sys.exit(asyncio.run(main(parse_database_url(parser.parse_args().url))))
