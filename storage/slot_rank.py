"""The rank of a compiled worker's style slots, sized once at its start.

Every styled denoising step pays for the slots' rank in every attention layer, so the
slots are only as large as the installed styles need (IMAGINE_LORA_SLOT_RANK=auto): the
smallest power of two of at least 8 that holds the largest style of the styles folder and
of the database, at most IMAGINE_LORA_MAX_RANK. A style added later with a larger rank
makes the slots grow (generation/lora.py): it runs at once, and styled jobs run uncompiled
until the worker restarts. A rank the owner fixed, or one above IMAGINE_LORA_MAX_RANK, is
refused with :meth:`SlotRank.refusal`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.blobs import BlobStore
from storage.errors import BlobNotFound
from storage.models import Style
from storage.settings import Settings
from storage.style_store import lora_rank_of

log = logging.getLogger(__name__)

SMALLEST_AUTO_RANK = 8


@dataclass(frozen=True)
class SlotRank:
    """The slots' rank and why it is that: the largest installed style's rank (0 with
    none), whether the owner fixed it, and IMAGINE_LORA_MAX_RANK."""

    rank: int
    largest: int
    fixed: bool
    limit: int

    def describe(self) -> str:
        """The start's log line."""
        how = " (IMAGINE_LORA_SLOT_RANK)" if self.fixed else ""
        if not self.largest:
            return f"style slots of rank {self.rank}{how}: no style is installed"
        capped = (
            f", above IMAGINE_LORA_MAX_RANK ({self.limit})"
            if self.largest > self.limit and not self.fixed
            else ""
        )
        return (
            f"style slots of rank {self.rank}{how}: the largest installed style "
            f"is rank {self.largest}{capped}"
        )

    def refusal(self, style: str, rank: int) -> str:
        """Why the style ``style`` of rank ``rank`` cannot run here: above
        IMAGINE_LORA_MAX_RANK, or above a rank the owner fixed (sized slots grow instead)."""
        start = f"The LoRA of style {style!r} has rank {rank}"
        if rank > self.limit:
            return (
                f"{start}, above IMAGINE_LORA_MAX_RANK ({self.limit}), the largest rank style "
                f"slots take; use a LoRA of rank {self.limit} or less, or ask the bot's owner "
                "to raise that setting and restart the worker."
            )
        return (
            f"{start}, above the rank-{self.rank} style slots of this worker "
            f"(IMAGINE_LORA_SLOT_RANK={self.rank}); it runs once the bot's owner sets "
            f"IMAGINE_LORA_SLOT_RANK to auto or {rank} or more and restarts the worker."
        )


def size_slots(fixed: int | None, ranks: Iterable[int], limit: int) -> SlotRank:
    """The slots for styles of ``ranks``: ``fixed`` if the owner set it, else the
    smallest power of two of at least 8 that holds the largest, at most ``limit``."""
    largest = max(ranks, default=0)
    if fixed is not None:
        return SlotRank(fixed, largest, True, limit)
    rank = SMALLEST_AUTO_RANK
    while rank < largest:
        rank *= 2
    return SlotRank(min(rank, limit), largest, False, limit)


def configured_slots(settings: Settings, ranks: Iterable[int]) -> SlotRank:
    """:func:`size_slots` for styles of ``ranks`` as ``settings`` say: the rank the owner
    fixed (IMAGINE_LORA_SLOT_RANK) or auto, within IMAGINE_LORA_MAX_RANK."""
    return size_slots(settings.fixed_slot_rank, ranks, settings.lora_max_rank)


async def stored_style_rank(session: AsyncSession, blobs: BlobStore) -> int:
    """The largest rank among the enabled styles stored by /style add, on every server
    (0 with none). A row added before ranks were recorded gets its rank from its blob's
    header, written back so the next start reads the column alone."""
    rows = await session.execute(
        select(Style.id, Style.lora_rank, Style.lora_blob_key).where(
            Style.enabled, Style.lora_blob_key.is_not(None)
        )
    )
    largest = 0
    for style_id, rank, key in rows.all():
        if rank is None and key is not None:
            rank = await _rank_of_blob(blobs, key)
            if rank is None:
                continue
            row = await session.get_one(Style, style_id)
            row.lora_rank = rank
        largest = max(largest, rank or 0)
    return largest


async def _rank_of_blob(blobs: BlobStore, key: str) -> int | None:
    try:
        data = await blobs.get(key)
    except BlobNotFound:
        log.warning("the LoRA blob %s of a stored style is missing; its rank is unknown", key)
        return None
    rank = lora_rank_of(data)
    if rank is None:
        log.warning("the LoRA blob %s of a stored style has no readable header", key)
    return rank
