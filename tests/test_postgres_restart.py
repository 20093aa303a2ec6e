"""The scaled mode survives PostgreSQL restarts: a throwaway server of its own, restarted
(``pg_ctl restart -m fast``) while jobs are queued, running and finishing, then stopped
for a while. Two real ``imagine worker`` processes; the real discord.py client (in this
process) against the fake Discord.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import selectinload

from bot.app import ImagineBot
from bot.deployment import open_deployment
from bot.services import Services
from generation.styles import StyleRegistry
from storage.blobs import DatabaseBlobStore
from storage.database import Database
from storage.errors import QueueUnavailable
from storage.families import FAMILIES
from storage.models import Generation, GenerationStatus
from storage.models import Worker as WorkerRow
from storage.settings import Settings
from tests.fake_discord import ALICE, BOB, MOD, FakeDiscord, Interaction, user
from tests.test_worker_processes import start_worker
from tests.throwaway_postgres import ThrowawayPostgres, required_bin_dir

S = GenerationStatus
MEMBERS = [ALICE, BOB, MOD, user(900_000_000_000_001_004, "dora")]
WORKERS = ("w1", "w2")


@asynccontextmanager
async def own_server() -> AsyncIterator[tuple[ThrowawayPostgres, URL]]:
    """A PostgreSQL server of this test's own, with a migrated ``imagine`` database."""
    import asyncpg

    from migrations import runner

    server = ThrowawayPostgres(required_bin_dir("the PostgreSQL restart tests"))
    admin = await asyncio.to_thread(server.start)
    try:
        connection = await asyncpg.connect(
            admin.set(drivername="postgresql").render_as_string(hide_password=False)
        )
        await connection.execute('CREATE DATABASE "imagine"')
        await connection.close()
        url = admin.set(database="imagine")
        database = Database(url)
        await runner.upgrade(database)
        await database.dispose()
        yield server, url
    finally:
        await asyncio.to_thread(server.stop)


async def until(
    check: Callable[[], Awaitable[Any]], what: str, within: float, report: Callable[[], str]
) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out after {within:.0f}s waiting for {what}\n{report()}")


def results_posted(fake: FakeDiscord, message_id: int) -> int:
    """How many times a message was edited into a finished result (one with buttons)."""
    message = fake.messages[message_id]
    states = [*message["history"][1:], message]
    return sum(1 for state in states if state["components"])


async def test_a_restarted_and_a_stopped_server_lose_no_job_and_answer_every_member(
    tmp_path: Path,
) -> None:
    async with own_server() as (server, url):
        logs = {name: tmp_path / f"{name}.log" for name in WORKERS}

        def report() -> str:
            parts = [f"--- {name}.log ---\n{log.read_text()[-8000:]}" for name, log in logs.items()]
            return "\n".join([*parts, f"--- postgres.log ---\n{server.log_tail()}"])

        workers = [start_worker(url, name, tmp_path, stale_seconds=10) for name in WORKERS]
        fake = FakeDiscord()
        await fake.start()
        fake.install()
        settings = Settings(
            data_dir=tmp_path,
            database_url=url.render_as_string(hide_password=False),
            model="tiny",
            styles_dir=tmp_path / "styles",
            max_running_per_user=1,
            max_queued_per_user=10,
            worker_stale_seconds=10,
        )
        (tmp_path / "styles").mkdir()
        bot: ImagineBot | None = None
        try:
            async with open_deployment(settings) as deployment:
                services = Services.for_deployment(
                    deployment,
                    StyleRegistry.from_folder(tmp_path / "styles"),
                    FAMILIES["tiny-sd"],
                    progress_interval=0.05,
                )
                bot = ImagineBot(services)
                await bot.login("fake-token")
                connecting = asyncio.create_task(bot.connect(reconnect=False))
                await asyncio.wait_for(bot.wait_until_ready(), 20)
                database = deployment.database

                async def workers_ready() -> bool:
                    async with database.session() as session:
                        beating = await session.scalars(select(WorkerRow.name))
                        return set(beating) == set(WORKERS)

                # Loading torch and warming up is slow on a busy CI machine; not under test.
                await until(workers_ready, "both workers to start", 240, report)

                async def rows() -> list[Generation]:
                    async with database.session() as session:
                        found = await session.scalars(
                            select(Generation)
                            .options(selectinload(Generation.images))
                            .order_by(Generation.id)
                        )
                        return list(found)

                asked: list[Interaction] = []
                for number in range(6):
                    asked.append(
                        await fake.slash(
                            "imagine",
                            by=MEMBERS[number % len(MEMBERS)],
                            options={"prompt": f"a lighthouse number {number} --steps 4"},
                        )
                    )
                    if number < len(MEMBERS):  # a member's first job creates their record

                        async def recorded(count: int = number + 1) -> bool:
                            return len(await rows()) == count

                        await until(recorded, "the first job of a member", 20, report)

                async def mid_run() -> bool:
                    statuses = [row.status for row in await rows()]
                    return (
                        len(statuses) == len(asked)
                        and S.RUNNING in statuses
                        and S.QUEUED in statuses
                        and S.SUCCEEDED in statuses
                    )

                await until(mid_run, "jobs queued, running and finished at once", 120, report)
                await asyncio.to_thread(server.restart)

                async def all_delivered() -> bool:
                    found = await rows()
                    return len(found) == len(asked) and all(
                        row.delivered_at is not None for row in found
                    )

                await until(all_delivered, "every result delivered", 180, report)
                await bot.delivery.idle()
                for worker, name in zip(workers, WORKERS, strict=True):
                    assert worker.poll() is None, f"worker {name} exited\n{report()}"

                # The server is down: /imagine answers with a sentence, and works again after.
                await asyncio.to_thread(server.shut_down)
                during = await fake.slash(
                    "imagine", by=ALICE, options={"prompt": "a boat in the outage --steps 4"}
                )
                said = await fake.wait_for(
                    lambda: fake.said_privately(during), within=30, what="an answer"
                )
                assert said == str(QueueUnavailable())
                await asyncio.to_thread(server.start_again)
                after = await fake.slash(
                    "imagine", by=BOB, options={"prompt": "a boat after the outage --steps 4"}
                )
                asked.append(after)

                await until(all_delivered, "the result after the outage", 120, report)
                await bot.delivery.idle()
                found = await rows()
                assert len(found) == len(asked), [row.id for row in found]
                blobs = DatabaseBlobStore(database)
                # Each /imagine's own message holds exactly one generation.
                assert sorted(row.message_id or 0 for row in found) == sorted(
                    interaction.original_id or -1 for interaction in asked
                )
                for row in found:
                    assert row.status is S.SUCCEEDED, (row.id, row.status, row.error, report())
                    assert row.attempts <= 2, (row.id, row.attempts)
                    assert sorted(image.index for image in row.images) == list(range(4))
                    for image in row.images:
                        assert await blobs.get(image.blob_key)
                    assert row.grid_blob_key is not None and await blobs.get(row.grid_blob_key)
                    assert row.message_id is not None
                    assert results_posted(fake, row.message_id) == 1, row.id
                async with database.session() as session:
                    jobs = set(
                        await session.scalars(
                            text("SELECT DISTINCT status FROM procrastinate_jobs")
                        )
                    )
                # Nothing left to run or stuck "doing" under a worker that lost the database.
                assert jobs <= {"succeeded", "failed"}, (jobs, report())
        finally:
            if bot is not None:
                await bot.close()
                await asyncio.gather(connecting, return_exceptions=True)
            fake.uninstall()
            await fake.stop()
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
            for worker in workers:
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
        for worker in workers:
            assert worker.returncode == 0, report()


async def test_the_bot_s_event_stream_listens_and_sweeps_again_after_an_outage() -> None:
    """The listener re-LISTENs once the server is back, and the sweep, which failed while
    it was down, keeps running: a result whose NOTIFY nobody heard still arrives."""
    from storage.events import JobEvent, JobStarted, JobSucceeded
    from storage.generations import transition
    from storage.models import GenerationKind
    from storage.pg_events import PostgresEventBus
    from storage.queue import RowQueue, Submission
    from storage.recipe import Recipe
    from storage.scheduling import Limits

    async with own_server() as (server, url):
        database = Database(url)
        bus = PostgresEventBus(database, sweep_seconds=0.5)
        heard: list[JobEvent] = []

        async def consume() -> None:
            async for event in bus.subscribe():
                heard.append(event)

        async def hears(wanted: Callable[[JobEvent], bool], what: str) -> None:
            async def found() -> bool:
                return any(wanted(event) for event in heard)

            await until(found, what, 30, server.log_tail)

        consuming = asyncio.create_task(consume())
        try:
            await asyncio.sleep(0.5)
            bus.publish(JobStarted(generation_id=1, worker_name="before"))
            await hears(lambda e: isinstance(e, JobStarted), "an event before the outage")

            await asyncio.to_thread(server.shut_down)
            await asyncio.sleep(1.5)  # sweeps and reconnects fail meanwhile
            await asyncio.to_thread(server.start_again)

            recipe = Recipe(
                model="tiny", prompt="p", seed=1, width=64, height=64, steps=1, guidance=1
            )
            queue = RowQueue(database, Limits(1, 10))
            generation = await queue.submit(Submission(GenerationKind.IMAGINE, recipe, 1))
            async with database.session() as session:  # finished with no NOTIFY at all
                await transition(session, generation.id, S.RUNNING, worker_name="w")
                await transition(session, generation.id, S.SUCCEEDED)
            await hears(
                lambda e: isinstance(e, JobSucceeded) and e.generation_id == generation.id,
                "the sweep to find a result finished after the outage",
            )
            # What is sent before the listener is back is lost (the sweep covers final
            # events), so a worker keeps sending until it is heard.
            publisher = PostgresEventBus(database)

            async def heard_again() -> bool:
                if any(isinstance(e, JobStarted) and e.worker_name == "after" for e in heard):
                    return True
                publisher.publish(JobStarted(generation_id=2, worker_name="after"))
                return False

            await until(heard_again, "a NOTIFY after the outage", 30, server.log_tail)
            await publisher.close()
        finally:
            consuming.cancel()
            await asyncio.gather(consuming, return_exceptions=True)
            await bus.close()
            await database.dispose()


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (ConnectionRefusedError(111, "Connect call failed"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (OSError(28, "No space left on device"), False),  # a full disk is the job's failure
        (ValueError("bad recipe"), False),
    ],
)
def test_what_counts_as_the_database_being_away(error: Exception, outage: bool) -> None:
    from storage.database import is_unavailable

    wrapped = RuntimeError("while storing the images")
    wrapped.__cause__ = error
    assert is_unavailable(error) is outage
    assert is_unavailable(wrapped) is outage
