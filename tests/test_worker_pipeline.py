"""The worker keeps the engine busy: a job's images are encoded and stored while the
engine runs the next job, and a job that runs out of GPU memory is retried one image at
a time, or fails with a sentence, and the worker goes on.

Real parts: the tiny pipeline, a migrated SQLite database, the row queue, a folder blob
store (one that, for the first job, waits for the test and then finds the disk full).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from generation.engine import TEST_FAULT_ENV, CancelToken, Engine, Progress
from generation.worker import Worker
from storage.blobs import LocalBlobStore
from storage.database import Database
from storage.errors import BlobStoreFull
from storage.events import JobEvent, JobFailed, JobProgress, JobSucceeded, LocalEventBus
from storage.generations import get_generation
from storage.models import Generation, GenerationKind, GenerationStatus
from storage.queue import Cancellations, RowJobs, RowQueue, Submission
from storage.recipe import Recipe
from storage.scheduling import Limits
from tests.conftest import migrated_database
from tests.test_disk_full import FULL
from tests.test_disk_full import recipe as small_job

S = GenerationStatus
LIMITS = Limits(max_running_per_user=1, max_queued_per_user=10)


def recipe(prompt: str, *, count: int = 2) -> Recipe:
    """64×64, two steps (as the full-disk tests' jobs), ``count`` images."""
    return small_job(prompt, seed=5).model_copy(update={"count": count})


class HeldFirstWrite(LocalBlobStore):
    """A folder store whose first write waits for ``release`` and then finds the disk full,
    as a slow disk filling up during a job's finishing would."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.writes = 0

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        self.writes += 1
        if self.writes == 1:
            self.held.set()
            await self.release.wait()
            raise BlobStoreFull()
        return await super().put_many(datas)


class Recorded:
    """Every event the worker publishes, in order, and a wait for one that matches."""

    def __init__(self, bus: LocalEventBus) -> None:
        self.events: list[JobEvent] = []
        self.changed = asyncio.Event()
        self._bus = bus

    async def listen(self) -> None:
        async for event in self._bus.subscribe():
            self.events.append(event)
            self.changed.set()

    async def first(self, kind: type[JobEvent], generation_id: int) -> int:
        """The position of the first ``kind`` event of ``generation_id``, once it comes."""
        while True:
            for position, event in enumerate(self.events):
                if isinstance(event, kind) and event.generation_id == generation_id:
                    return position
            self.changed.clear()
            await self.changed.wait()


def _worker(database: Database, blobs: LocalBlobStore, engine: Engine, **options: Any) -> Worker:
    """A worker on the row queue; ``options``: more of :class:`Worker`'s keywords."""
    return Worker(
        database,
        blobs,
        engine,
        jobs=RowJobs(database, LIMITS),
        events=LocalEventBus(),
        cancellations=Cancellations(),
        **options,
    )


@asynccontextmanager
async def serving(
    database: Database, blobs: LocalBlobStore, engine: Engine
) -> AsyncIterator[tuple[RowQueue, Recorded, Worker, asyncio.Event, asyncio.Task[None]]]:
    queue = RowQueue(database, LIMITS)
    bus = LocalEventBus()
    recorded = Recorded(bus)
    listening = asyncio.create_task(recorded.listen())
    await asyncio.sleep(0)  # subscribed before the worker publishes
    worker = Worker(
        database,
        blobs,
        engine,
        jobs=RowJobs(database, LIMITS, wakeup=queue.wakeup),
        events=bus,
        cancellations=Cancellations(),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        yield queue, recorded, worker, stop, running
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=120)
        listening.cancel()


async def submit(queue: RowQueue, prompt: str, requester: int, **changes: int) -> int:
    job = Submission(GenerationKind.IMAGINE, recipe(prompt, **changes), requester_id=requester)
    return (await queue.submit(job)).id


async def load(database: Database, generation_id: int) -> Generation:
    async with database.session() as session:
        return await get_generation(session, generation_id)


async def test_the_next_job_runs_on_the_engine_while_the_last_one_is_stored(
    tmp_path: Path, request: pytest.FixtureRequest, tiny_engine: Engine
) -> None:
    blobs = HeldFirstWrite(tmp_path / "blobs")
    async with migrated_database("sqlite", tmp_path, request) as database:
        async with serving(database, blobs, tiny_engine) as (queue, recorded, worker, stop, run):
            first = await submit(queue, "a harbour", requester=1)
            second = await submit(queue, "a lighthouse", requester=2)
            await asyncio.wait_for(blobs.held.wait(), timeout=120)
            # The first job's blob write is held; the engine runs the second all the same
            # (before, the worker took no job until the first one's write returned).
            await asyncio.wait_for(recorded.first(JobProgress, second), timeout=120)
            assert (await load(database, first)).status is S.RUNNING

            stop.set()  # shutdown waits for the job being stored
            await asyncio.sleep(0.2)
            assert not run.done()
            blobs.release.set()
            await asyncio.wait_for(run, timeout=120)
            assert worker.gave_up is None

        failed, succeeded = await load(database, first), await load(database, second)
        # The full disk fails the job it happened to, with its sentence; not the next one.
        assert failed.status is S.FAILED and failed.error == FULL and failed.images == []
        assert succeeded.status is S.SUCCEEDED, succeeded.error
        assert [image.index for image in succeeded.images] == [0, 1]
        assert succeeded.grid_blob_key is not None
        for image in succeeded.images:
            assert await blobs.exists(image.blob_key)
        finals = [e for e in recorded.events if isinstance(e, JobSucceeded | JobFailed)]
        assert sorted((type(e).__name__, e.generation_id) for e in finals) == [
            ("JobFailed", first),
            ("JobSucceeded", second),
        ]
        # The first job's end came after the engine started the second: by the events' order.
        ended = await recorded.first(JobFailed, first)
        assert ended > await recorded.first(JobProgress, second)


def pixels(image: object) -> np.ndarray:
    from PIL import Image

    assert isinstance(image, Image.Image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_out_of_memory_is_retried_one_image_at_a_time(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    batched = tiny_engine.txt2img(recipe("a meadow", count=3), encode=False)
    monkeypatch.setenv(TEST_FAULT_ENV, "oom:meadow")  # every call of several images
    events: list[Progress] = []
    alone = tiny_engine.txt2img(recipe("a meadow", count=3), progress=events.append)
    assert [image.seed for image in alone] == [image.seed for image in batched]
    for one, many in zip(alone, batched, strict=True):
        assert np.abs(pixels(one.image) - pixels(many.image)).max() <= 2  # 2/255 as batched
        assert one.png  # encoded as usual
    steps = [(e.step, e.total) for e in events if e.preview is None]
    assert steps == [(n, 6) for n in range(1, 7)]  # three runs of two steps, one bar


async def test_a_job_that_never_fits_fails_with_its_size_and_the_worker_goes_on(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    tiny_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TEST_FAULT_ENV, "oom-always:enormous")
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with migrated_database("sqlite", tmp_path, request) as database:
        async with serving(database, blobs, tiny_engine) as (queue, recorded, worker, _, _):
            too_big = await submit(queue, "an enormous cathedral", requester=1, count=4)
            after = await submit(queue, "a small chapel", requester=2)
            await asyncio.wait_for(recorded.first(JobSucceeded, after), timeout=120)
            await asyncio.wait_for(recorded.first(JobFailed, too_big), timeout=120)
        failed = await load(database, too_big)
        assert failed.status is S.FAILED
        assert failed.error == (
            "64×64 × 4 images did not fit in the GPU's memory even one image at a time; "
            "try a smaller --ar or fewer images."
        )
        assert (await load(database, after)).status is S.SUCCEEDED
        assert worker.gave_up is None


async def test_the_engine_s_busy_seconds_are_its_calls_and_a_metric(
    tmp_path: Path, request: pytest.FixtureRequest, tiny_engine: Engine
) -> None:
    """``imagine_engine_busy_seconds`` grows by the time the pipelines ran, no more: its
    rate against the wall clock is how busy the GPU was."""
    from prometheus_client import generate_latest

    blobs = LocalBlobStore(tmp_path / "blobs")
    async with migrated_database("sqlite", tmp_path, request) as database:
        async with serving(database, blobs, tiny_engine) as (queue, recorded, worker, _, _):
            before = tiny_engine.busy_seconds
            started = time.perf_counter()
            job = await submit(queue, "a quiet pier", requester=1)
            await asyncio.wait_for(recorded.first(JobSucceeded, job), timeout=120)
            wall = time.perf_counter() - started
            busy = tiny_engine.busy_seconds - before
            assert 0 < busy < wall
        scraped = generate_latest(worker.metrics.registry).decode()
        (line,) = [row for row in scraped.splitlines() if row.startswith("imagine_engine_busy")]
        assert float(line.split()[-1]) == pytest.approx(tiny_engine.busy_seconds)
    alone = tiny_engine.busy_seconds
    tiny_engine.txt2img(recipe("a quiet pier"), encode=False)
    assert tiny_engine.busy_seconds > alone


async def test_a_job_ending_mid_query_lets_its_cancel_watcher_s_query_finish(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    tiny_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watcher polling a job's cancel flag is stopped when the job ends, perhaps in the
    middle of its query: the query still finishes and its connection goes back to the
    pool (cancelled there, the pool logged a traceback for about one job in a hundred)."""
    import generation.worker as worker_module

    started, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_flag(session: object, generation_id: int) -> bool:
        started.set()
        await release.wait()
        finished.set()
        return False

    monkeypatch.setattr(worker_module, "cancel_requested", slow_flag)
    monkeypatch.setattr(worker_module, "CANCEL_POLL_SECONDS", 0)
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with migrated_database("sqlite", tmp_path, request) as database:
        worker = _worker(database, blobs, tiny_engine)
        watcher = asyncio.create_task(worker._watch_for_cancel(1, CancelToken()))
        await asyncio.wait_for(started.wait(), timeout=30)
        watcher.cancel()  # the job ended
        with pytest.raises(asyncio.CancelledError):
            await watcher
        release.set()
        await asyncio.wait_for(finished.wait(), timeout=30)


def before_each_heartbeat(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[int], Awaitable[None]]
) -> None:
    """The worker's heartbeats await ``before(n)`` for the n-th beat (the first is
    ``run()``'s own, before it takes jobs), then beat."""
    import generation.worker as worker_module

    real_heartbeat = worker_module.heartbeat
    beats = 0

    async def beat(session: AsyncSession, name: str, model: str) -> None:
        nonlocal beats
        beats += 1
        await before(beats)
        await real_heartbeat(session, name, model)

    monkeypatch.setattr(worker_module, "heartbeat", beat)


@asynccontextmanager
async def beating_worker(
    tmp_path: Path, request: pytest.FixtureRequest, engine: Engine
) -> AsyncIterator[asyncio.Event]:
    """A worker on a fresh SQLite database, beating every 10 ms, until the test sets the
    event it is given; then its ``run()`` must return within 30 s."""
    async with migrated_database("sqlite", tmp_path, request) as database:
        worker = _worker(database, LocalBlobStore(tmp_path / "b"), engine, heartbeat_seconds=0.01)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            yield stop
        finally:
            stop.set()
            await asyncio.wait_for(running, timeout=30)


async def test_a_worker_stopping_mid_heartbeat_lets_the_beat_s_query_finish(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    tiny_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker told to stop while its heartbeat is in the middle of a query waits for
    the query (cancelled there, the pool logged a traceback on the way out)."""
    started, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def second_is_slow(beat: int) -> None:
        if beat == 2:
            started.set()
            await release.wait()
            finished.set()

    before_each_heartbeat(monkeypatch, second_is_slow)
    async with beating_worker(tmp_path, request, tiny_engine) as stop:
        await asyncio.wait_for(started.wait(), timeout=30)
        stop.set()
        asyncio.get_running_loop().call_later(0.3, release.set)
    assert finished.is_set()  # run() returned after the beat, not in its middle


async def test_a_heartbeat_that_fails_is_logged_and_the_next_one_beats(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    tiny_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected error in one heartbeat is logged with its traceback, and the worker
    keeps beating: a worker whose heartbeat stopped for good would have its running jobs
    taken for a dead worker's and run a second time elsewhere."""
    later_beat = asyncio.Event()

    async def second_breaks(beat: int) -> None:
        if beat == 2:
            raise RuntimeError("something no one expected")
        if beat >= 3:
            later_beat.set()

    before_each_heartbeat(monkeypatch, second_breaks)
    async with beating_worker(tmp_path, request, tiny_engine):
        await asyncio.wait_for(later_beat.wait(), timeout=30)
    failed = [r for r in caplog.records if "the heartbeat failed" in r.getMessage()]
    assert failed and failed[0].exc_info is not None
    assert "something no one expected" in caplog.text
