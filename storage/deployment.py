"""The ports of one deployment, as :func:`bot.deployment.open_deployment` hands them out.

===============  ==================================  ====================================
port             embedded (default on SQLite)        scaled (default on PostgreSQL)
===============  ==================================  ====================================
``queue``        :class:`RowQueue`: rows only        :class:`ProcrastinateQueue`: rows
                                                     plus a procrastinate job each
``events``       :class:`LocalEventBus`:             :class:`PostgresEventBus`: NOTIFY,
                 in-process fan-out                  LISTEN plus a sweep
``blobs``        a folder                            the database (workers elsewhere)
``jobs``         :class:`RowJobs`: claim rows        :class:`ProcrastinateJobs`
===============  ==================================  ====================================

The queue and the job source share the in-process :class:`Cancellations` (and, when
embedded, the wake-up of a waiting worker). On PostgreSQL, ``cancel_listener`` lets a
worker hear cancels requested by other processes, in either mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

from storage.blobs import BlobStore
from storage.database import Database
from storage.events import EventBus
from storage.queue import Cancellations, CancelListener, JobQueue, JobSource
from storage.settings import Settings

Mode = Literal["embedded", "scaled"]


@dataclass(frozen=True)
class Deployment:
    """The ports of one process's deployment; open with :func:`open_deployment`."""

    mode: Mode
    settings: Settings
    database: Database
    blobs: BlobStore
    queue: JobQueue
    events: EventBus
    jobs: JobSource
    cancellations: Cancellations
    cancel_listener: CancelListener | None  # hears cancels from other processes, if it can
    _resources: contextlib.AsyncExitStack = field(
        default_factory=contextlib.AsyncExitStack, repr=False
    )

    async def close(self) -> None:
        """Close what :func:`start_deployment` opened (connections, procrastinate's pool)."""
        await self._resources.aclose()

    @property
    def bot_runs_worker(self) -> bool:
        """Whether ``imagine bot`` runs the worker in its own process (embedded) or
        leaves the jobs to ``imagine worker`` processes (scaled)."""
        return self.mode == "embedded"
