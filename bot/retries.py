"""Trying a Discord call again while Discord is down or rate limits us.

discord.py retries a little on its own: 429s that carry a ``Via`` header (up to
five tries), and on bot-token routes 500, 502, 504 and 524 (not 503); on
webhook routes every 5xx, five tries over about 25 seconds. An outage longer than
that, a 503, or a 429 from in front of Discord's API (no ``Via``) reaches us as an
exception: :func:`with_retries` waits and tries again, with bounded exponential
backoff and jitter, never less than a 429 asked for, until ``give_up_after``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import discord

from storage.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    first: float = 1.0  # seconds before the second try
    longest: float = 60.0  # the backoff stops doubling here
    give_up_after: float = 3600.0  # seconds since the first try

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            first=settings.discord_retry_first_seconds,
            longest=settings.discord_retry_max_seconds,
            give_up_after=settings.discord_retry_give_up_seconds,
        )

    def wait(self, attempt: int, asked: float | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (from 0)."""
        backoff = min(self.longest, self.first * 2 ** min(attempt, 32))
        # Jitter, so that many results held up by one outage do not return all at once.
        return max(random.uniform(backoff / 2, backoff), asked or 0.0)


def transient(error: BaseException) -> bool:
    """Whether trying again later may succeed: Discord down, slow or rate limiting us."""
    if isinstance(error, discord.RateLimited):
        return True
    if isinstance(error, discord.HTTPException):
        return error.status >= 500 or error.status == 429
    return isinstance(error, aiohttp.ClientError | OSError)  # TimeoutError is an OSError


def asked_to_wait(error: BaseException) -> float | None:
    """The seconds a 429 asked us to wait, if it said."""
    if isinstance(error, discord.RateLimited):
        return error.retry_after
    if not isinstance(error, discord.HTTPException) or error.status != 429:
        return None
    headers = getattr(error.response, "headers", None) or {}
    for name in ("X-RateLimit-Reset-After", "Retry-After"):
        try:
            return float(headers[name])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def describe(error: BaseException) -> str:
    if isinstance(error, discord.HTTPException):
        return f"HTTP {error.status}"
    return type(error).__name__


class GaveUp(Exception):
    """Discord did not take a call within the policy's bound."""


async def with_retries(policy: RetryPolicy, call: Callable[[], Awaitable[T]], what: str) -> T:
    """``call()``'s result, trying again while it fails with a :func:`transient` error.

    Raises :class:`GaveUp` once the next wait would end past ``give_up_after``;
    any other error at once.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as error:
            if not transient(error):
                raise
            wait = policy.wait(attempt, asked_to_wait(error))
            spent = time.monotonic() - started
            if spent + wait > policy.give_up_after:
                raise GaveUp(
                    f"{what}: Discord still answered {describe(error)} after "
                    f"{attempt + 1} tries over {spent:.0f} s"
                ) from error
            log.warning(
                "%s: Discord answered %s; trying again in %.2f s", what, describe(error), wait
            )
            await asyncio.sleep(wait)
            attempt += 1
