"""What the Discord front end needs from the rest of Imagine, gathered in one object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from bot.retries import RetryPolicy
from storage.blobs import BlobStore
from storage.controls import ControlError
from storage.database import Database
from storage.deployment import Deployment
from storage.events import EventBus
from storage.families import ModelFamily
from storage.queue import JobQueue
from storage.recipe import search_names
from storage.settings import Settings


class StyleCatalog(Protocol):
    """The styles a prompt may name (``generation.styles.StyleRegistry`` is one)."""

    def names(self) -> list[str]: ...

    def search(self, text: str, limit: int = 25) -> list[str]: ...

    def default_weights(self) -> dict[str, float]: ...


class ControlCatalog(Protocol):
    """The controls this deployment runs (``generation.controls.ControlRegistry`` is one)."""

    def find(self, kind: str, family: str) -> object:
        """The control of type ``kind`` for ``family``; ``ControlError`` naming what there is."""
        ...


class _NoControls:
    def find(self, kind: str, family: str) -> object:
        raise ControlError(
            f"There is no {kind} control for {family} models; no controls are installed "
            "(an administrator adds them to IMAGINE_CONTROLS_DIR)."
        )


@dataclass
class Services:
    settings: Settings
    database: Database
    blobs: BlobStore
    queue: JobQueue
    styles: StyleCatalog
    family: ModelFamily
    events: EventBus
    style_weights: Mapping[str, float] = field(default_factory=dict)
    progress_interval: float = 1.5  # seconds between progress edits of one message
    token_lifetime: timedelta = timedelta(minutes=14)  # Discord's is 15
    retries: RetryPolicy = field(default_factory=RetryPolicy)  # for a result Discord refused
    controls: ControlCatalog = field(default_factory=_NoControls)

    # Styles added from Discord, by server, with their default weights; kept current by
    # the /style commands.
    guild_style_weights: dict[int, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def for_deployment(
        cls,
        deployment: Deployment,
        styles: StyleCatalog,
        family: ModelFamily,
        *,
        progress_interval: float = 1.5,
    ) -> Services:
        """The bot's services on ``deployment``'s ports."""
        from generation.controls import ControlRegistry  # torch-free, like the styles

        return cls(
            settings=deployment.settings,
            database=deployment.database,
            blobs=deployment.blobs,
            queue=deployment.queue,
            styles=styles,
            family=family,
            events=deployment.events,
            style_weights=styles.default_weights(),
            progress_interval=progress_interval,
            retries=RetryPolicy.from_settings(deployment.settings),
            controls=ControlRegistry.from_folder(deployment.settings.resolved_controls_dir),
        )

    def known_styles(self, guild_id: int | None = None) -> list[str]:
        """The folder's styles and, in a server, the ones it added from Discord."""
        names = set(self.styles.names())
        if guild_id is not None:
            names |= set(self.guild_style_weights.get(guild_id, {}))
        return sorted(names)

    def default_weights(self, guild_id: int | None = None) -> dict[str, float]:
        """Each style's default weight where a prompt runs: the folder's and, in a server,
        those of the styles it added from Discord (which shadow folder styles of the same
        name)."""
        server = self.guild_style_weights.get(guild_id, {}) if guild_id is not None else {}
        return {**self.style_weights, **server}

    def search_styles(self, guild_id: int | None, text: str, limit: int = 25) -> list[str]:
        return search_names(self.known_styles(guild_id), text, limit)
