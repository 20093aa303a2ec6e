"""What each base-model family expects: pixel budget and sensible defaults.

Shared by the prompt language (bot side, no torch) and the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from storage.checkpoints import checkpoint_family


@dataclass(frozen=True)
class ModelFamily:
    name: str
    native_side: int  # width = height at the family's training resolution
    default_steps: int
    default_guidance: float
    latent_channels: int

    @property
    def pixel_budget(self) -> int:
        return self.native_side * self.native_side


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily("sd15", 512, 30, 7.0, 4),
        ModelFamily("sd2", 768, 30, 7.0, 4),
        ModelFamily("sdxl", 1024, 30, 6.0, 4),
        ModelFamily("sd3", 1024, 28, 7.0, 16),
        ModelFamily("flux", 1024, 28, 3.5, 16),
        # The tiny random-weight test models: small enough to run on a CPU in a second.
        ModelFamily("tiny-sd", 96, 4, 5.0, 4),
        ModelFamily("tiny-sdxl", 96, 4, 5.0, 4),
    )
}


# The ratios /imagine offers as choices; a compiled engine warms up at each one's size.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (3, 2),
    (2, 3),
    (4, 3),
    (3, 4),
    (16, 9),
    (9, 16),
    (21, 9),
)


def size_for(ratio: tuple[int, int] | None, family: ModelFamily) -> tuple[int, int]:
    """Width and height near the family's pixel budget, multiples of 8, for a ratio."""
    if ratio is None:
        return family.native_side, family.native_side
    aspect = ratio[0] / ratio[1]
    width = math.sqrt(family.pixel_budget * aspect)
    height = width / aspect

    def snap(side: float) -> int:
        return min(4096, max(64, 8 * round(side / 8)))

    return snap(width), snap(height)


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        from storage.errors import ConfigError

        raise ConfigError(f"Unknown model family {name!r}; known families: {known}.") from None


def guess_family(model: str) -> ModelFamily:
    """The family a model name most likely belongs to, without loading it.

    The engine checks the guess against the loaded weights; the bot uses it to
    size ``--ar`` before any GPU work.
    """
    if model.endswith(".safetensors"):
        found = checkpoint_family(Path(model).expanduser())
        if found is not None:  # a checkpoint file says what it is in its header
            return FAMILIES[found]
    name = model.lower().replace("_", "-")
    if name in {"tiny", "tiny-sd"}:
        return FAMILIES["tiny-sd"]
    if name == "tiny-sdxl":
        return FAMILIES["tiny-sdxl"]
    if "flux" in name:
        return FAMILIES["flux"]
    if "stable-diffusion-3" in name or "sd3" in name:
        return FAMILIES["sd3"]
    if "xl" in name or "pony" in name or "illustrious" in name:
        return FAMILIES["sdxl"]
    if "stable-diffusion-2" in name or "sd2" in name:
        return FAMILIES["sd2"]
    return FAMILIES["sd15"]


def configured_family(model: str, setting: str = "auto") -> ModelFamily:
    """The family named by ``IMAGINE_MODEL_FAMILY``, or the guess from the model name."""
    return guess_family(model) if setting == "auto" else get_family(setting)
