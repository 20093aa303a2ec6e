"""Loading the engine for a command, with a line on stderr before and after."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from storage.settings import Settings

if TYPE_CHECKING:
    from generation.engine import Engine


def load_engine(settings: Settings) -> Engine:
    """The engine for ``settings.model``; imports torch and diffusers (seconds)."""
    from generation.engine import Engine

    started = time.perf_counter()
    print(f"loading {settings.model} ...", file=sys.stderr, flush=True)
    engine = Engine.from_settings(settings)
    print(
        f"loaded {engine.model_id} ({engine.family.name}) on {engine.device} "
        f"in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return engine
