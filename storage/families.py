"""What each base-model family expects: pixel budget and sensible defaults.

Shared by the prompt language (bot side, no torch) and the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        ModelFamily("tiny-sd", 64, 4, 5.0, 4),
        ModelFamily("tiny-sdxl", 64, 4, 5.0, 4),
    )
}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        from storage.errors import ConfigError

        raise ConfigError(f"Unknown model family {name!r}; known families: {known}.") from None
