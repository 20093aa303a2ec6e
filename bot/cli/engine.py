"""Loading the engine for a command, with a line on stderr before and after."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from storage.settings import Settings

if TYPE_CHECKING:
    from generation.engine import Engine
    from storage.deployment import Deployment


async def stored_style_rank(deployment: Deployment) -> int:
    """The largest rank of the styles in the database, which the engine's style slots
    must hold (with the styles folder's): asked before the engine is built."""
    from storage.slot_rank import stored_style_rank as largest_stored

    async with deployment.database.session() as session:
        return await largest_stored(session, deployment.blobs)


def load_engine(settings: Settings, stored_style_rank: int = 0) -> Engine:
    """The engine for ``settings.model``; imports torch and diffusers (seconds).
    ``stored_style_rank``: see :func:`stored_style_rank`."""
    from generation.engine import Engine

    started = time.perf_counter()
    print(f"loading {settings.model} ...", file=sys.stderr, flush=True)
    engine = Engine.from_settings(settings, stored_style_rank=stored_style_rank)
    print(
        f"loaded {engine.model_id} ({engine.family.name}) on {engine.device} "
        f"in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return engine
