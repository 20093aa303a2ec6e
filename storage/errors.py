"""Errors that carry a sentence a person can act on.

Every user-facing failure in Imagine is an :class:`ImagineError`; its ``str``
is shown as-is (in the terminal or as an ephemeral Discord message).
"""

from __future__ import annotations


class ImagineError(Exception):
    """Base for errors whose message is meant for a person, not a traceback."""


class ConfigError(ImagineError):
    """A setting is missing, malformed, or points at something unusable."""


class DatabaseUnavailable(ImagineError):
    """The configured database cannot be reached or used."""


class DatabaseMisconfigured(DatabaseUnavailable):
    """The server answers but refuses this configuration (no such database, a login it
    rejects): waiting will not bring it back, the settings must change."""


class NotFound(ImagineError):
    """A record asked for by id does not exist."""


class IllegalTransition(ImagineError):
    """A generation was asked to move to a status its current status forbids."""

    def __init__(self, generation_id: int, current: str, target: str) -> None:
        super().__init__(f"Generation {generation_id} is {current} and cannot become {target}.")
        self.generation_id = generation_id
        self.current = current
        self.target = target


class BlobNotFound(NotFound):
    """No blob is stored under a key."""


class QueueUnavailable(DatabaseUnavailable):
    """The queue's database cannot be written now (locked, restarting, down a while): a
    member is told to try again, and nothing is lost."""

    MESSAGE = "The queue is unavailable right now; try again in a minute."

    def __init__(self, message: str = MESSAGE) -> None:
        super().__init__(message)


class BlobStoreFull(ImagineError):
    """The blob store has no room left (the disk or the database's disk is full, or a quota)."""

    def __init__(self) -> None:
        super().__init__("The image store is full; ask the bot's owner to free space.")
