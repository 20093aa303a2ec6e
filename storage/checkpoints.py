"""Single-file checkpoints: which family a ``.safetensors`` file is, from its header alone.

Torch-free, so the bot can size ``--ar`` and check style uploads for the family of a
Civitai checkpoint without loading it; the engine loads it by the same entry
(generation/single_file.py). Adding a family (SD3, FLUX) is one entry in
:data:`CHECKPOINT_FAMILIES` plus its config folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage.errors import ConfigError
from storage.safetensors_header import HeaderError, read_header

UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class CheckpointFamily:
    """How to recognise and load one family's single-file checkpoints."""

    family: str  # a key of storage.families.FAMILIES
    pipeline: str  # the diffusers pipeline class
    marker: str  # a key that only this family's checkpoints hold
    conv_in_width: int | None = None  # the denoiser's first width, where it tells models apart
    tokenizers: tuple[str, ...] = ()  # tokenizer folders needing the CLIP vocabulary
    tiny_model: str | None = None  # take the configs from this tiny model's folder
    t5_tokenizer: str | None = None  # the tokenizer folder needing T5's sentencepiece model
    configs: str | None = None  # the folder of single_file_configs/, if not the family's name
    width_key: str = UNET_CONV_IN  # the tensor whose first dimension is that width
    without: tuple[str, ...] = ()  # keys this family's checkpoints never hold
    # The keys cannot tell a distilled variant from its base (SD 3.5 Large Turbo is shaped
    # as Large), so the file's name picks it, as a hub id's does (families.variant_family).
    named_variants: bool = False


_SDXL = "conditioner.embedders.1.model.positional_embedding"
_SD1 = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
_SD2 = "cond_stage_model.model.token_embedding.weight"
# MMDiT (SD3) and FLUX keys, found with or without the ``model.diffusion_model.`` prefix.
_SD3 = "joint_blocks.0.x_block.attn.qkv.weight"
_SD35_MEDIUM = "joint_blocks.0.x_block.attn2.qkv.weight"  # SD 3.5 medium's dual attention
_SD35_QK_NORM = "joint_blocks.0.x_block.attn.ln_q.weight"  # SD 3.5's RMS norm; SD 3 has none
_SD3_WIDTH = "x_embedder.proj.weight"
_FLUX = "double_blocks.0.img_attn.qkv.weight"
_FLUX_DEV = "guidance_in.in_layer.weight"  # dev's distilled guidance; schnell has none
_FLUX_WIDTH = "img_in.weight"

# First match wins: the tiny test models before the real ones whose layout they share.
CHECKPOINT_FAMILIES: tuple[CheckpointFamily, ...] = (
    CheckpointFamily("tiny-sdxl", "StableDiffusionXLPipeline", _SDXL, 32, tiny_model="tiny-sdxl"),
    CheckpointFamily("sdxl", "StableDiffusionXLPipeline", _SDXL, 320, ("tokenizer", "tokenizer_2")),
    CheckpointFamily("tiny-sd", "StableDiffusionPipeline", _SD1, 32, tiny_model="tiny"),
    CheckpointFamily("sd15", "StableDiffusionPipeline", _SD1, 320, ("tokenizer",)),
    # No configs shipped: SD 2 comes as 512 px epsilon and 768 px v-prediction models
    # whose files cannot be told apart; it loads from the hub when downloads are allowed.
    CheckpointFamily("sd2", "StableDiffusionPipeline", _SD2),
    CheckpointFamily(
        "tiny-sd3",
        "StableDiffusion3Pipeline",
        _SD3,
        32,
        tiny_model="tiny-sd3",
        width_key=_SD3_WIDTH,
    ),
    # SD 3.5 medium (width 1536, dual attention), SD 3.5 large and large turbo (2432, QK
    # norm), SD 3 medium (1536, neither): each is one set of configs.
    CheckpointFamily(
        "sd3",
        "StableDiffusion3Pipeline",
        _SD35_MEDIUM,
        1536,
        ("tokenizer", "tokenizer_2"),
        width_key=_SD3_WIDTH,
        t5_tokenizer="tokenizer_3",
        configs="sd35-medium",
        named_variants=True,
    ),
    CheckpointFamily(
        "sd3",
        "StableDiffusion3Pipeline",
        _SD35_QK_NORM,
        2432,
        ("tokenizer", "tokenizer_2"),
        width_key=_SD3_WIDTH,
        t5_tokenizer="tokenizer_3",
        configs="sd35-large",
        without=(_SD35_MEDIUM,),
        named_variants=True,
    ),
    CheckpointFamily(
        "sd3",
        "StableDiffusion3Pipeline",
        _SD3,
        1536,
        ("tokenizer", "tokenizer_2"),
        width_key=_SD3_WIDTH,
        t5_tokenizer="tokenizer_3",
        configs="sd3-medium",
        without=(_SD35_MEDIUM, _SD35_QK_NORM),
        named_variants=True,
    ),
    # Any other MMDiT (another width, or dual attention without QK norm) ships no configs:
    # it loads from the hub when downloads are allowed.
    CheckpointFamily("sd3", "StableDiffusion3Pipeline", _SD3, named_variants=True),
    # Dev or schnell alike: the tiny model's transformer is read with or without guidance.
    CheckpointFamily(
        "tiny-flux", "FluxPipeline", _FLUX, 32, tiny_model="tiny-flux", width_key=_FLUX_WIDTH
    ),
    CheckpointFamily(
        "flux",
        "FluxPipeline",
        _FLUX_DEV,
        3072,
        ("tokenizer",),
        width_key=_FLUX_WIDTH,
        t5_tokenizer="tokenizer_2",
        configs="flux-dev",
    ),
    CheckpointFamily(
        "flux-schnell",
        "FluxPipeline",
        _FLUX,
        3072,
        ("tokenizer",),
        width_key=_FLUX_WIDTH,
        t5_tokenizer="tokenizer_2",
        configs="flux-schnell",
    ),
)


def unreadable(path: Path, reason: object) -> ConfigError:
    return ConfigError(
        f"{path} is not a readable .safetensors file ({reason}); it may be empty or cut short, "
        "so download it again or point IMAGINE_MODEL at another checkpoint."
    )


def read_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from the safetensors header (no weight is read)."""
    try:
        header = read_header(path)
        header.check_offsets()
        return header.shapes()
    except HeaderError as exc:
        raise unreadable(path, exc) from None


def detect_checkpoint(path: Path, shapes: dict[str, list[int]]) -> CheckpointFamily:
    """The family of a single-file checkpoint, from its keys and the UNet's first width."""
    conv_in = shapes.get(UNET_CONV_IN)
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ConfigError(
            f"{path} is an inpainting checkpoint (its UNet reads {conv_in[1]} channels, not 4); "
            "Imagine generates from text, so use the normal version of this model."
        )
    bare = {key.removeprefix("model.diffusion_model."): shape for key, shape in shapes.items()}
    for entry in CHECKPOINT_FAMILIES:
        if entry.marker not in shapes and entry.marker not in bare:
            continue
        if any(key in shapes or key in bare for key in entry.without):
            continue
        width = shapes.get(entry.width_key) or bare.get(entry.width_key)
        if entry.conv_in_width is None or (width and width[0] == entry.conv_in_width):
            return entry
    raise ConfigError(
        f"{path} is not a Stable Diffusion 1.x/2.x, SDXL, SD3 or FLUX checkpoint that "
        "Imagine can read (none of their keys is in it; an SDXL refiner or a UNet-only file "
        "cannot generate alone); use a diffusers folder or hub id for other models."
    )


def checkpoint_entry(path: Path) -> CheckpointFamily | None:
    """The entry of the checkpoint file at ``path``, or None where it cannot be told."""
    try:
        return detect_checkpoint(path, read_shapes(path))
    except ConfigError:
        return None
