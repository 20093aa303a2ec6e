"""The samplers Imagine offers: one list for the prompt language, the engine and the PNG text.

Torch-free: the bot refuses an unknown ``--sampler`` from this list before anything is
queued, and the engine builds each entry from the loaded model's own scheduler config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

DEFAULT_SAMPLER = "default"  # the loaded model's own scheduler, as its files configure it


@dataclass(frozen=True)
class Sampler:
    name: str  # as typed after --sampler
    a1111: str  # as AUTOMATIC1111 writes it: Civitai and sd-parsers read this name
    scheduler: str  # the diffusers scheduler class
    # Set over the model's scheduler config. The keys a name promises (Karras sigmas, SDE)
    # are pinned, so the A1111 name stays true whatever the model's own config says.
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def _sampler(name: str, a1111: str, scheduler: str, **config: Any) -> Sampler:
    return Sampler(name, a1111, scheduler, MappingProxyType(config))


SAMPLERS: tuple[Sampler, ...] = (
    _sampler("euler", "Euler", "EulerDiscreteScheduler"),
    _sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
    _sampler(
        "dpmpp_2m",
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        algorithm_type="dpmsolver++",
        use_karras_sigmas=False,
    ),
    _sampler(
        "dpmpp_2m_karras",
        "DPM++ 2M Karras",
        "DPMSolverMultistepScheduler",
        algorithm_type="dpmsolver++",
        use_karras_sigmas=True,
    ),
    _sampler(
        "dpm_sde",
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        algorithm_type="sde-dpmsolver++",
        use_karras_sigmas=False,
    ),
    _sampler("ddim", "DDIM", "DDIMScheduler"),
    _sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
    _sampler("lcm", "LCM", "LCMScheduler"),
    _sampler("heun", "Heun", "HeunDiscreteScheduler"),
    # Stable Diffusion 1.5's own scheduler: PNDM without its Runge-Kutta warm-up is PLMS.
    _sampler("plms", "PLMS", "PNDMScheduler", skip_prk_steps=True),
)
SAMPLER_NAMES: tuple[str, ...] = (DEFAULT_SAMPLER, *(sampler.name for sampler in SAMPLERS))

# Schedulers a model may bring as its default that the list does not offer.
_OTHER_A1111_NAMES = {
    "PNDMScheduler": "PNDM",
    "LMSDiscreteScheduler": "LMS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DEISMultistepScheduler": "DEIS",
    "DDPMScheduler": "DDPM",
    "FlowMatchEulerDiscreteScheduler": "Euler",
}


def get_sampler(name: str) -> Sampler | None:
    """The listed sampler called ``name``; ``None`` for ``default`` and unknown names."""
    return next((sampler for sampler in SAMPLERS if sampler.name == name), None)


def unknown_sampler_message(name: str) -> str:
    return f"Unknown sampler {name!r}; use one of {', '.join(SAMPLER_NAMES)}."


def candidates(scheduler: str) -> list[Sampler]:
    """The listed samplers built on the class ``scheduler``, most specific first."""
    return sorted(
        (sampler for sampler in SAMPLERS if sampler.scheduler == scheduler),
        key=lambda sampler: -len(sampler.config),
    )


def a1111_name(scheduler: str, config: Mapping[str, Any]) -> str:
    """AUTOMATIC1111's name for a diffusers scheduler class and its config.

    A scheduler that none of those names fits keeps its class name: honest, if unknown
    to Civitai.
    """
    for sampler in candidates(scheduler):
        if all(config.get(key) == value for key, value in sampler.config.items()):
            return sampler.a1111
    return _OTHER_A1111_NAMES.get(scheduler, scheduler)


def a1111_sampler(name: str) -> str | None:
    """The A1111 name of a sampler of the list; ``None`` for ``default`` and unknown names."""
    sampler = get_sampler(name)
    return sampler.a1111 if sampler is not None else None
