"""``imagine status | cancel | worker``: the queue from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from bot.runtime import Runtime, open_runtime
from storage.models import GenerationStatus
from storage.queue import EmbeddedQueue
from storage.scheduling import Limits
from storage.settings import Settings, load_settings

S = GenerationStatus


def register(commands: Any) -> None:
    status = commands.add_parser("status", help="a generation's status, queue position and wait")
    status.add_argument("generation_id", type=int)
    status.set_defaults(handler=_status)

    cancel = commands.add_parser("cancel", help="cancel a queued or running generation")
    cancel.add_argument("generation_id", type=int)
    cancel.set_defaults(handler=_cancel)

    worker = commands.add_parser(
        "worker", help="run queued generations from the configured database until stopped"
    )
    worker.add_argument("--model", help="model to use instead of IMAGINE_MODEL")
    worker.add_argument("--name", help="worker name in records and logs (default host-pid)")
    worker.set_defaults(handler=_worker)


def make_queue(runtime: Runtime) -> EmbeddedQueue:
    """The embedded queue on SQLite; on PostgreSQL the procrastinate one (open its app
    with :func:`open_queue`)."""
    settings = runtime.settings
    limits = Limits(settings.max_running_per_user, settings.max_queued_per_user)
    if settings.is_embedded:
        return EmbeddedQueue(runtime.database, limits)
    from storage.scaled_queue import ProcrastinateQueue, make_app

    return ProcrastinateQueue(runtime.database, limits, make_app(runtime.database.url))


@asynccontextmanager
async def open_queue(runtime: Runtime) -> AsyncIterator[EmbeddedQueue]:
    queue = make_queue(runtime)
    app = getattr(queue, "app", None)
    if app is None:
        yield queue
        return
    async with app.open_async():
        yield queue


def _status(args: argparse.Namespace) -> int:
    async def status() -> int:
        runtime = await open_runtime(load_settings())
        try:
            async with open_queue(runtime) as queue:
                where = await queue.position(args.generation_id)
        finally:
            await runtime.close()
        if where.status is S.QUEUED:
            print(
                f"generation {args.generation_id}: queued, #{where.position} in line, "
                f"about {where.estimated_wait_seconds:.0f}s to wait"
            )
        else:
            print(f"generation {args.generation_id}: {where.status.value}")
        return 0

    return asyncio.run(status())


def _cancel(args: argparse.Namespace) -> int:
    async def cancel() -> int:
        runtime = await open_runtime(load_settings())
        try:
            async with open_queue(runtime) as queue:
                generation = await queue.cancel(args.generation_id)
        finally:
            await runtime.close()
        if generation.status is S.CANCELLED:
            print(f"generation {generation.id}: cancelled")
        elif generation.status is S.RUNNING:
            print(f"generation {generation.id}: running; its worker stops it within a second")
        else:
            print(
                f"generation {generation.id}: already {generation.status.value}, nothing to cancel"
            )
        return 0

    return asyncio.run(cancel())


def _worker(args: argparse.Namespace) -> int:
    settings: Settings = load_settings(model=args.model) if args.model else load_settings()
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    async def work() -> int:
        from bot.cli.local import _load_engine

        runtime = await open_runtime(settings)
        try:
            engine = _load_engine(settings)
            async with open_queue(runtime) as queue:
                await _serve(settings, runtime, engine, queue, name)
        finally:
            await runtime.close()
        return 0

    return asyncio.run(work())


async def _serve(
    settings: Settings, runtime: Runtime, engine: Any, queue: EmbeddedQueue, name: str
) -> None:
    """Run jobs until SIGTERM/SIGINT: from the rows (SQLite) or from procrastinate."""
    from generation.worker import EmbeddedWorker, run_with_procrastinate

    notifier = None
    if not settings.is_embedded:
        from storage.pg_events import Notifier

        notifier = Notifier(runtime.database.url)
        queue.forward = notifier.send
    worker = EmbeddedWorker(
        queue,
        runtime.blobs,
        engine,
        name=name,
        heartbeat_seconds=settings.worker_heartbeat_seconds,
        stale_seconds=settings.worker_stale_seconds,
    )
    if settings.metrics_port:
        worker.metrics.serve(settings.metrics_port)
    seconds = await asyncio.to_thread(engine.warm_up)
    logging.getLogger(__name__).info("warmed up in %.2fs", seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # The job in hand finishes; then the worker exits.
        loop.add_signal_handler(signum, stop.set)
    logging.getLogger(__name__).info(
        "worker %s ready on %s, metrics on port %s, %s",
        name,
        engine.device,
        settings.metrics_port or "(off)",
        "embedded queue" if settings.is_embedded else "procrastinate queue",
    )
    try:
        if settings.is_embedded:
            await worker.run(stop)
        else:
            await run_with_procrastinate(worker, queue, stop)
    finally:
        if notifier is not None:
            await notifier.close()
