"""The scaled mode survives PostgreSQL restarts: a throwaway server of its own, restarted
(``pg_ctl restart -m fast``) while jobs are queued, running and finishing, then stopped
for a while. Real processes: ``imagine bot`` (scaled mode) against the fake Discord
served by this test, two ``imagine worker`` processes and the server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from asyncpg.exceptions import TooManyConnectionsError
from sqlalchemy import select, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import selectinload

from storage.blobs import DatabaseBlobStore
from storage.database import Database, is_unavailable
from storage.errors import DatabaseMisconfigured, QueueUnavailable
from storage.models import Generation, GenerationStatus
from storage.models import Worker as WorkerRow
from tests.fake_discord import ALICE, BOB, MOD, FakeDiscord, Interaction, user
from tests.test_bot_cli import SHIM
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


def start_bot(url: URL, fake: FakeDiscord, data_dir: Path) -> subprocess.Popen[str]:
    """``imagine bot`` in the scaled mode against ``fake``; its log in data_dir/bot.log."""
    shim = data_dir / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    (data_dir / "styles").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env |= {
        "PYTHONPATH": os.pathsep.join([str(shim), str(Path(__file__).parent.parent)]),
        "FAKE_DISCORD_API": f"{fake.base}/api/v10",
        "FAKE_DISCORD_GATEWAY": f"ws://127.0.0.1:{fake.port}/gateway",
        "DISCORD_TOKEN": "fake-token",
        "IMAGINE_DATABASE_URL": url.render_as_string(hide_password=False),
        "IMAGINE_DATA_DIR": str(data_dir),
        "IMAGINE_STYLES_DIR": str(data_dir / "styles"),
        "IMAGINE_MODEL": "tiny",
        "IMAGINE_MAX_RUNNING_PER_USER": "1",
        "IMAGINE_MAX_QUEUED_PER_USER": "10",
        "IMAGINE_WORKER_STALE_SECONDS": "10",
        "IMAGINE_WEB_PORT": "0",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "bot"],
        env=env,
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=(data_dir / "bot.log").open("a"),
        text=True,
    )


async def test_a_restarted_and_a_stopped_server_lose_no_job_and_answer_every_member(
    tmp_path: Path,
) -> None:
    async with own_server() as (server, url):
        names = ("bot", *WORKERS)
        logs = {name: tmp_path / f"{name}.log" for name in names}

        def report() -> str:
            parts = [
                f"--- {name}.log ---\n{log.read_text()[-8000:]}"
                for name, log in logs.items()
                if log.exists()
            ]
            return "\n".join([*parts, f"--- postgres.log ---\n{server.log_tail()}"])

        # One job at a time: batches of two would leave almost no moment with jobs queued,
        # running and finished at once, which is when the restart must come.
        workers = [
            start_worker(url, name, tmp_path, stale_seconds=10, IMAGINE_MAX_BATCH="1")
            for name in WORKERS
        ]
        fake = FakeDiscord()
        await fake.start()
        bot: subprocess.Popen[str] | None = None
        database = Database(url)
        try:
            bot = start_bot(url, fake, tmp_path)

            async def bot_ready() -> bool:
                assert bot is not None and bot.poll() is None, f"imagine bot exited\n{report()}"
                return "ready as imagine" in logs["bot"].read_text()

            await until(bot_ready, "imagine bot to be ready", 60, report)

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
                return (
                    len(found) == len(asked)
                    and all(row.delivered_at is not None for row in found)
                    # delivered_at is written once the result is posted; the bot's own
                    # edits still in flight then have landed when the fake shows them.
                    and all(
                        row.message_id is not None and results_posted(fake, row.message_id)
                        for row in found
                    )
                )

            # The bot's LISTEN reconnects by itself: results finished after the restart arrive.
            await until(all_delivered, "every result delivered", 180, report)
            assert bot.poll() is None, f"imagine bot exited\n{report()}"
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
            assert bot.poll() is None, f"imagine bot exited after the outage\n{report()}"

            async def bot_listens_again() -> bool:
                # Only the bot LISTENs for job events, and every backend is new since the
                # server came back: this one is the bot's listener, reconnected by itself.
                async with database.session() as session:
                    listening = await session.scalar(
                        text(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE query ILIKE 'LISTEN %imagine_events%'"
                        )
                    )
                    return bool(listening)

            await until(bot_listens_again, "the bot's LISTEN after the outage", 30, report)
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
                    await session.scalars(text("SELECT DISTINCT status FROM procrastinate_jobs"))
                )
            # Nothing left to run or stuck "doing" under a worker that lost the database.
            assert jobs <= {"succeeded", "failed"}, (jobs, report())
            for worker, name in zip(workers, WORKERS, strict=True):
                assert worker.poll() is None, f"worker {name} exited\n{report()}"
        finally:
            processes = [p for p in (bot, *workers) if p is not None]
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    await asyncio.to_thread(process.wait, 30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            await fake.stop()
            await database.dispose()
        assert bot.returncode == 0, f"imagine bot: exit {bot.returncode}\n{report()}"
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
        (socket.gaierror(-3, "Temporary failure in name resolution"), True),
        (TooManyConnectionsError("sorry, too many clients already"), True),
        (OSError(28, "No space left on device"), False),  # a full disk is the job's failure
        (ValueError("bad recipe"), False),
    ],
)
def test_what_counts_as_the_database_being_away(error: Exception, outage: bool) -> None:
    wrapped = RuntimeError("while storing the images")
    wrapped.__cause__ = error
    assert is_unavailable(error) is outage
    assert is_unavailable(wrapped) is outage


async def test_a_database_that_does_not_exist_is_not_waited_for(postgres_admin_url: URL) -> None:
    """A worker that lost the server waits for it to come back; a server that answers but
    has no such database (or refuses the login) will not fix itself: say so at once."""
    database = Database(postgres_admin_url.set(database="imagine_no_such_database"))
    try:
        with pytest.raises(DatabaseMisconfigured) as refused:
            await asyncio.wait_for(database.wait_until_back(every=0.1), timeout=20)
    finally:
        await database.dispose()
    assert "has no database 'imagine_no_such_database'" in str(refused.value)
    assert "createdb" in str(refused.value)
    assert not is_unavailable(refused.value)
