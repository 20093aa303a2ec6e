"""``imagine status | cancel | worker``: the queue from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from typing import Any

from bot.deployment import open_deployment
from storage.deployment import Deployment
from storage.models import GenerationStatus
from storage.settings import Settings, load_settings

S = GenerationStatus
EXIT_TOO_MANY_FAILURES = 3
"""`imagine worker`'s exit code after it stopped over failed jobs: restart it."""


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


def _status(args: argparse.Namespace) -> int:
    async def status() -> int:
        async with open_deployment(load_settings()) as deployment:
            where = await deployment.queue.position(args.generation_id)
            idle = where.status is S.QUEUED and not where.workers
            model = await _model_of(deployment, args.generation_id) if idle else ""
        if idle:
            print(
                f"generation {args.generation_id}: queued, #{where.position} in line; "
                f"no worker is running for {model}: start `imagine bot` (embedded) "
                "or `imagine worker`"
            )
        elif where.status is S.QUEUED:
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
        async with open_deployment(load_settings()) as deployment:
            generation = await deployment.queue.cancel(args.generation_id)
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
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    async def work() -> int:
        async with open_deployment(settings) as deployment:
            return await serve_worker(deployment, name)

    return asyncio.run(work())


async def _model_of(deployment: Deployment, generation_id: int) -> str:
    from storage.generations import get_generation

    async with deployment.database.session() as session:
        return (await get_generation(session, generation_id)).model


async def serve_worker(deployment: Deployment, name: str) -> int:
    """Load the engine, warm it up, and run jobs until SIGTERM/SIGINT (the job in hand
    finishes first) or until too many fail in a row; returns the process's exit code."""
    from bot.cli.engine import load_engine, stored_style_rank
    from generation.worker import Worker

    log = logging.getLogger(__name__)
    settings = deployment.settings
    rank = await stored_style_rank(deployment)
    engine = await asyncio.to_thread(load_engine, settings, rank)
    worker = Worker.for_deployment(
        deployment,
        engine,
        name=name,
        max_consecutive_failures=settings.max_consecutive_failures,
    )
    if settings.metrics_port:
        worker.metrics.serve(settings.metrics_port)
    seconds = await asyncio.to_thread(engine.warm_up)
    log.info("warmed up in %.2fs", seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "worker %s ready on %s, metrics on port %s, %s mode",
        name,
        engine.device,
        settings.metrics_port or "(off)",
        deployment.mode,
    )
    await worker.run(stop)
    if worker.gave_up is not None:
        log.error("worker %s exits with code %d: %s", name, EXIT_TOO_MANY_FAILURES, worker.gave_up)
        return EXIT_TOO_MANY_FAILURES
    return 0
