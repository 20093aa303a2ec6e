"""Each server's policy, kept in memory for a few seconds: /imagine reads it on every
submission, and it changes rarely.

A change made through this bot's /policy applies at once (:meth:`GuildPolicies.forget`
after the change is committed); one made elsewhere (another bot process on the same
database) applies within :data:`POLICY_LIFETIME` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from storage.community import guild_policy
from storage.database import Database
from storage.models import Guild

POLICY_LIFETIME = 10.0


class GuildPolicies:
    """Servers' policy rows, read at most once per ``lifetime`` seconds each; members of
    one server who ask at once share one read."""

    def __init__(
        self,
        database: Database,
        lifetime: float = POLICY_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database = database
        self.lifetime = lifetime
        self.clock = clock
        # In order of reading, so that expired entries are at the front.
        self._reads: OrderedDict[int, tuple[float, asyncio.Future[Guild]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._reads)

    async def get(self, guild_id: int) -> Guild:
        now = self.clock()
        self._forget_expired(now)
        entry = self._reads.get(guild_id)
        if entry is None or _failed(entry[1]):
            entry = (now, asyncio.ensure_future(self._read(guild_id)))
            self._reads[guild_id] = entry
            self._reads.move_to_end(guild_id)
        # Shielded: a member whose command is cancelled does not cancel the others' read.
        return await asyncio.shield(entry[1])

    def forget(self, guild_id: int) -> None:
        """Read the server's policy afresh next time (call after committing a change)."""
        self._reads.pop(guild_id, None)

    async def _read(self, guild_id: int) -> Guild:
        async with self.database.autocommit_session() as session:
            return await guild_policy(session, guild_id)

    def _forget_expired(self, now: float) -> None:
        while self._reads:
            read_at, _ = next(iter(self._reads.values()))
            if now - read_at < self.lifetime:
                return
            self._reads.popitem(last=False)


def _failed(read: asyncio.Future[Guild]) -> bool:
    return read.done() and (read.cancelled() or read.exception() is not None)
