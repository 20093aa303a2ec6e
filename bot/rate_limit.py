"""Per-member command rate limits: at most N commands in any window of W seconds.

A sliding log in the bot's memory: for each member, the times of their accepted
commands in the last window (at most N of them). Members are kept in order of
their newest command, so those idle for a whole window are dropped from the
front as new commands arrive: the table holds only the members who sent a
command within the last window, however many members a server has.

One bot process keeps one table; the limit is per process, not shared between
bots on one database. :class:`Turns` bounds all members together: how many commands
are worked on at once, and how many may wait for that.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.settings import Settings


class RateLimiter:
    """At most ``count`` accepted commands per member in any ``window`` seconds."""

    def __init__(
        self, count: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if count < 1 or window <= 0:
            raise ValueError("a rate limit needs at least one command in a positive window")
        self.count = count
        self.window = window
        self.clock = clock
        self._accepted: OrderedDict[int, deque[float]] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter | None:
        """The limiter ``IMAGINE_RATE_LIMIT`` asks for; ``None`` when it is off."""
        rate = settings.member_rate
        return None if rate is None else cls(*rate)

    def __len__(self) -> int:
        """Members remembered now: those with a command accepted within the last window."""
        return len(self._accepted)

    def try_acquire(self, member_id: int) -> float:
        """Record a command of ``member_id`` if the limit allows it and return 0; otherwise
        record nothing and return the seconds until it would be allowed (above 0)."""
        now = self.clock()
        self._forget_idle(now)
        times = self._accepted.get(member_id)
        if times is None:
            times = self._accepted[member_id] = deque(maxlen=self.count)
        elif len(times) == self.count and (wait := times[0] + self.window - now) > 0:
            return min(self.window, wait)
        times.append(now)
        # Kept in order of the newest accepted command, so idle members are at the front.
        self._accepted.move_to_end(member_id)
        return 0.0

    def _forget_idle(self, now: float) -> None:
        while self._accepted:
            member_id, times = next(iter(self._accepted.items()))
            if times[-1] + self.window - now > 0:
                return
            del self._accepted[member_id]


def too_fast(seconds: float) -> str:
    """The sentence a member over the limit gets."""
    whole = max(1, math.ceil(seconds))
    return f"You're going too fast: try again in {whole} second{'s' if whole != 1 else ''}."


class Turns:
    """Work done a few at a time, and a bound on how much may wait its turn.

    Each command waiting here holds its interaction and what discord.py built for it
    (about 11 KiB); when members send commands faster than they can be queued, the
    line would grow without end. :attr:`full` says when it is as long as allowed, so
    a new command is refused, before any work, rather than kept."""

    def __init__(self, at_once: int, most_waiting: int) -> None:
        self._semaphore = asyncio.Semaphore(at_once)
        self.most_waiting = most_waiting
        self.waiting = 0

    @property
    def full(self) -> bool:
        return self.waiting >= self.most_waiting

    async def __aenter__(self) -> None:
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1

    async def __aexit__(self, *_: object) -> None:
        self._semaphore.release()


BUSY = "Imagine has more requests waiting than it can keep right now; try again in a minute."
