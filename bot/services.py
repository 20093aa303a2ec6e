"""What the Discord front end needs from the rest of Imagine, gathered in one object."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from storage.blobs import BlobStore
from storage.database import Database
from storage.families import ModelFamily
from storage.queue import JobEvent, JobQueue
from storage.settings import Settings


class StyleCatalog(Protocol):
    """The styles a prompt may name (``generation.styles.StyleRegistry`` is one)."""

    def names(self) -> list[str]: ...

    def search(self, text: str, limit: int = 25) -> list[str]: ...


@dataclass
class Services:
    settings: Settings
    database: Database
    blobs: BlobStore
    queue: JobQueue
    styles: StyleCatalog
    family: ModelFamily
    events: Callable[[], AsyncIterator[JobEvent]]
    style_weights: Mapping[str, float] = field(default_factory=dict)
    progress_interval: float = 1.5  # seconds between progress edits of one message
    token_lifetime: timedelta = timedelta(minutes=14)  # Discord's is 15

    def known_styles(self) -> Collection[str]:
        return self.styles.names()
