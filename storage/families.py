"""What each base-model family expects: pixel budget, defaults, limits and capabilities.

Shared by the prompt language (bot side, no torch) and the engine. A family is data:
code asks it questions (does it take a negative prompt? how long may the T5 prompt
be? which flags does it refuse, and why?) instead of testing family names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from storage.checkpoints import CheckpointFamily, checkpoint_entry

_NO_SAMPLER = (
    "{label} samples by flow matching with its own scheduler, which the listed samplers "
    "do not fit; leave --sampler out (or use --sampler default)."
)
_NO_NEGATIVE = (
    "{label} has no negative prompt; describe what you want instead (e.g. 'an empty beach' "
    "rather than --no people)."
)
_NO_GUIDANCE = (
    "{label} is guidance-distilled and ignores --cfg; leave it out (it runs at {guidance})."
)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    native_side: int  # width = height at the family's training resolution
    default_steps: int
    default_guidance: float
    latent_channels: int
    label: str = ""  # how sentences name it; the name if empty
    # Sides are multiples of this: the VAE's scale (8), times 2 where the transformer packs
    # 2x2 latent patches (SD3, FLUX). diffusers refuses other SD3 sizes and rounds FLUX's down.
    size_step: int = 8
    # FLUX packs 2x2 latent patches into tokens: (batch, tokens, 4 * channels).
    packed_latents: bool = False
    negative_prompt: bool = True
    # Tokens the T5 encoder reads (None: no T5); a longer prompt is refused, never cut.
    max_sequence_length: int | None = None
    # The pipeline component that tokenizes for T5.
    t5_tokenizer: str | None = None
    # The latent space's preview projection (generation/previews.py).
    latent_format: str = "sd15"
    # Flags this family cannot honour, each with the sentence that says why and what instead.
    refused_flags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Which ControlNet architecture serves it (the class is picked in generation/controlnet.py)
    # and the pipelines diffusers has a ControlNet variant of for it.
    controlnet: str = "unet"
    control_kinds: tuple[str, ...] = ("txt2img", "img2img", "inpaint")
    # For a kind it lacks: why, and what to do instead ({label}: its name in sentences).
    control_gaps: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def pixel_budget(self) -> int:
        return self.native_side * self.native_side

    @property
    def shown_name(self) -> str:
        return self.label or self.name

    def control_refusal(self, kind: str) -> str | None:
        """Why this family takes no control on a ``kind`` (txt2img, img2img, inpaint)
        generation, or None if it does."""
        if kind in self.control_kinds:
            return None
        done = {"txt2img": "text-to-image", "img2img": "variation", "inpaint": "inpainting"}
        names = [done[k] for k in self.control_kinds] or ["no"]
        offered = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        refused = f"{self.shown_name} models take controls only on {offered} generations"
        gap = self.control_gaps.get(kind)
        if gap is not None:
            return f"{refused}: {gap.format(label=self.shown_name)}"
        article = "an" if done[kind][0] in "aeiou" else "a"
        return f"{refused}, not on {article} {done[kind]}; leave the controls out of this one."

    def snap(self, side: float) -> int:
        """``side`` to the nearest multiple of the size step, from 64 to 4096 pixels."""
        step = self.size_step
        return min(4096 // step * step, max(64, step * round(side / step)))

    def size_refusal(self, width: int, height: int) -> str | None:
        """Why this family cannot make a ``width`` × ``height`` image, or None if it can."""
        if width % self.size_step == 0 and height % self.size_step == 0:
            return None
        return (
            f"{self.shown_name} makes images whose sides are multiples of {self.size_step} "
            f"pixels, and {width}×{height} is not; ask again with /imagine, which sizes "
            "every --ar to fit."
        )

    def refusal(self, flag: str) -> str | None:
        """Why this family refuses ``--flag``, or None if it honours it."""
        template = self.refused_flags.get(flag)
        if template is None:
            return None
        return template.format(label=self.shown_name, guidance=self.default_guidance)


def _refusing(*pairs: tuple[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(pairs))


_SD3 = ModelFamily(
    "sd3",
    1024,
    28,
    4.5,
    16,
    label="SD 3.5",
    size_step=16,
    max_sequence_length=256,
    t5_tokenizer="tokenizer_3",
    latent_format="sd3",
    refused_flags=_refusing(("sampler", _NO_SAMPLER)),
    controlnet="sd3",
    control_kinds=("txt2img",),
    # diffusers 0.42: StableDiffusion3ControlNetInpaintingPipeline feeds the ControlNet the
    # masked image and its mask (an inpainting ControlNet with an extra conditioning
    # channel, alimama-creative's), never a depth, pose or edge map; and there is no SD3
    # ControlNet image-to-image pipeline at all.
    control_gaps=MappingProxyType(
        {
            "img2img": (
                "diffusers has no image-to-image ControlNet pipeline for {label}, so image "
                "prompts with --iw and variations cannot take one. Leave out --iw (the image "
                "then gives only the structure) or the controls; on a FLUX model, variations "
                "take controls."
            ),
            "inpaint": (
                "diffusers inpaints {label} with a ControlNet only through an inpainting "
                "ControlNet, which reads the image and its mask, not through the depth, pose "
                "or edge ControlNets that controls run. Leave the controls out of this Zoom "
                "Out or Pan; on a FLUX model, inpainting takes controls."
            ),
        }
    ),
)
# FLUX.1-dev's guidance is distilled: a guidance embedding, no second (negative) pass.
_FLUX = ModelFamily(
    "flux",
    1024,
    28,
    3.5,
    16,
    label="FLUX.1 dev",
    size_step=16,
    packed_latents=True,
    negative_prompt=False,
    max_sequence_length=512,
    t5_tokenizer="tokenizer_2",
    latent_format="flux",
    refused_flags=_refusing(("no", _NO_NEGATIVE), ("sampler", _NO_SAMPLER)),
    controlnet="flux",
    control_kinds=("txt2img", "img2img", "inpaint"),
)


def _without_guidance(family: ModelFamily) -> Mapping[str, str]:
    return _refusing(*family.refused_flags.items(), ("cfg", _NO_GUIDANCE))


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily("sd15", 512, 30, 7.0, 4),
        ModelFamily("sd2", 768, 30, 7.0, 4),
        ModelFamily("sdxl", 1024, 30, 6.0, 4, latent_format="sdxl"),
        _SD3,
        replace(
            _SD3,
            name="sd3-turbo",
            label="SD 3.5 Large Turbo",
            default_steps=4,
            default_guidance=0.0,
            refused_flags=_without_guidance(_SD3),
        ),
        _FLUX,
        replace(
            _FLUX,
            name="flux-schnell",
            label="FLUX.1 schnell",
            default_steps=4,
            default_guidance=0.0,
            max_sequence_length=256,
            refused_flags=_without_guidance(_FLUX),
        ),
        # The tiny random-weight test models: small enough to run on a CPU in a second.
        ModelFamily("tiny-sd", 96, 4, 5.0, 4),
        ModelFamily("tiny-sdxl", 96, 4, 5.0, 4, latent_format="sdxl"),
        # Their T5 reads 32 tokens, so a test can pass the limit with a short prompt. They
        # keep the size step of 16 (their small VAE needs only 4) so tests meet the real rule.
        replace(
            _SD3,
            name="tiny-sd3",
            label="tiny SD3",
            native_side=96,
            default_steps=4,
            default_guidance=5.0,
            max_sequence_length=32,
        ),
        replace(
            _FLUX,
            name="tiny-flux",
            label="tiny FLUX",
            native_side=96,
            default_steps=4,
            max_sequence_length=32,
        ),
    )
}

# Built-in model names and the family each is.
TINY_FAMILIES = {
    "tiny": "tiny-sd",
    "tiny-sd": "tiny-sd",
    "tiny-sdxl": "tiny-sdxl",
    "tiny-sd3": "tiny-sd3",
    "tiny-flux": "tiny-flux",
}

# A diffusers folder's model_index.json ``_class_name`` → family (before name hints).
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}

# Words in a model's name that pick a variant of its base family.
_VARIANTS = {"sd3": (("turbo", "sd3-turbo"),), "flux": (("schnell", "flux-schnell"),)}


# The ratios /imagine offers as choices; IMAGINE_COMPILE_SIZES=all warms up at each size.
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
    """Width and height near the family's pixel budget, multiples of its size step, for a
    ratio."""
    if ratio is None:
        return family.snap(family.native_side), family.snap(family.native_side)
    aspect = ratio[0] / ratio[1]
    width = math.sqrt(family.pixel_budget * aspect)
    height = width / aspect
    return family.snap(width), family.snap(height)


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        from storage.errors import ConfigError

        raise ConfigError(f"Unknown model family {name!r}; known families: {known}.") from None


def base_family(name: str) -> str:
    """The family that variant ``name`` narrows (flux-schnell → flux, sd3-turbo → sd3): what
    is made for the base (a ControlNet) serves the variant too. Any other family: ``name``."""
    for base, variants in _VARIANTS.items():
        if any(variant == name for _word, variant in variants):
            return base
    return name


def variant_family(base: str, model: str) -> ModelFamily:
    """``base`` (sd3, flux, ...) narrowed by the model's name: FLUX schnell, SD 3.5 Turbo."""
    name = model.lower()
    for word, variant in _VARIANTS.get(base, ()):
        if word in name:
            return FAMILIES[variant]
    return FAMILIES[base]


def file_family(entry: CheckpointFamily, path: Path) -> ModelFamily:
    """A checkpoint file's family: its keys' entry, narrowed by the file's name where the
    keys cannot tell (``sd3_large_turbo.safetensors`` is shaped as SD 3.5 Large)."""
    if entry.named_variants:
        return variant_family(entry.family, path.name)
    return FAMILIES[entry.family]


def _folder_family(model: str) -> ModelFamily | None:
    """The family a local diffusers folder names in its model_index.json, if it is one."""
    index = Path(model).expanduser() / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    base = PIPELINE_FAMILIES.get(str(class_name))
    if base == "flux":
        try:
            transformer = json.loads((index.parent / "transformer" / "config.json").read_text())
        except (OSError, ValueError):
            transformer = {}
        if transformer.get("guidance_embeds") is False:
            return FAMILIES["flux-schnell"]
    return variant_family(base, model) if base else None


def guess_family(model: str) -> ModelFamily:
    """The family a model name (or local folder) most likely belongs to, without loading it.

    The engine checks the guess against the loaded weights; the bot uses it to
    size ``--ar`` before any GPU work.
    """
    if model in TINY_FAMILIES:
        return FAMILIES[TINY_FAMILIES[model]]
    from_folder = _folder_family(model)
    if from_folder is not None:
        return from_folder
    if model.endswith(".safetensors"):
        path = Path(model).expanduser()
        found = checkpoint_entry(path)
        if found is not None:  # a checkpoint file says what it is in its header
            return file_family(found, path)
    name = model.lower().replace("_", "-")
    if "flux" in name:
        return variant_family("flux", name)
    if "stable-diffusion-3" in name or "sd3" in name:
        return variant_family("sd3", name)
    if "xl" in name or "pony" in name or "illustrious" in name:
        return FAMILIES["sdxl"]
    if "stable-diffusion-2" in name or "sd2" in name:
        return FAMILIES["sd2"]
    return FAMILIES["sd15"]


def configured_family(model: str, setting: str = "auto") -> ModelFamily:
    """The family named by ``IMAGINE_MODEL_FAMILY``, or the guess from the model name."""
    return guess_family(model) if setting == "auto" else get_family(setting)
