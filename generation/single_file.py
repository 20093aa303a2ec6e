"""Single-file checkpoints, as Civitai ships them, loaded with no network.

A checkpoint in the original key layout (``model.diffusion_model.…``,
``first_stage_model.…``, ``cond_stage_model.…`` or ``conditioner.embedders.…``)
holds weights only. diffusers' ``from_single_file`` would fetch the family's
diffusers configs and tokenizers from the hub; here they come from a table keyed
by family: configs shipped in ``single_file_configs/<family>/`` (or the tiny
model's own folder), the CLIP tokenizer's vocabulary from a local folder or the
Hugging Face cache. Adding a family (SD3, FLUX) is one entry in the table plus
its config folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from generation.tiny import ensure_tiny_model
from storage.errors import ConfigError
from storage.settings import Settings

CONFIGS = Path(__file__).parent / "single_file_configs"
_UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
# Hub repositories whose cached tokenizer files serve every CLIP-L/bigG tokenizer: the
# BPE vocabulary is the same, only the special tokens differ (they come from our configs).
_CACHED_TOKENIZERS = (
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer/"),
)
_VOCAB_FILES = ("vocab.json", "merges.txt")


@dataclass(frozen=True)
class CheckpointFamily:
    """How to recognise and load one family's single-file checkpoints."""

    family: str  # a key of storage.families.FAMILIES
    pipeline: str  # the diffusers pipeline class
    marker: str  # a key that only this family's checkpoints hold
    conv_in_width: int | None = None  # the UNet's first width, where it tells models apart
    tokenizers: tuple[str, ...] = ()  # tokenizer folders needing the CLIP vocabulary
    tiny_model: str | None = None  # take the configs from this tiny model's folder

    def config_folder(self, settings: Settings) -> Path | None:
        if self.tiny_model is not None:
            return ensure_tiny_model(self.tiny_model, settings.data_dir / "models")
        folder = CONFIGS / self.family
        return folder if (folder / "model_index.json").is_file() else None


_SDXL = "conditioner.embedders.1.model.positional_embedding"
_SD1 = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
_SD2 = "cond_stage_model.model.token_embedding.weight"

# First match wins: the tiny test models before the real ones whose layout they share.
CHECKPOINT_FAMILIES: tuple[CheckpointFamily, ...] = (
    CheckpointFamily("tiny-sdxl", "StableDiffusionXLPipeline", _SDXL, 32, tiny_model="tiny-sdxl"),
    CheckpointFamily("sdxl", "StableDiffusionXLPipeline", _SDXL, 320, ("tokenizer", "tokenizer_2")),
    CheckpointFamily("tiny-sd", "StableDiffusionPipeline", _SD1, 32, tiny_model="tiny"),
    CheckpointFamily("sd15", "StableDiffusionPipeline", _SD1, 320, ("tokenizer",)),
    # No configs shipped: SD 2 comes as 512 px epsilon and 768 px v-prediction models
    # whose files cannot be told apart; it loads from the hub when downloads are allowed.
    CheckpointFamily("sd2", "StableDiffusionPipeline", _SD2),
)


def _unreadable(path: Path, exc: Exception) -> ConfigError:
    return ConfigError(
        f"{path} is not a readable .safetensors file ({exc}); it may be empty or cut short, "
        "so download it again or point IMAGINE_MODEL at another checkpoint."
    )


def read_header(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, read from the header without loading any weight."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()  # the handle itself is not iterable
            return {key: list(handle.get_slice(key).get_shape()) for key in names}
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None


def detect_checkpoint(path: Path, shapes: dict[str, list[int]]) -> CheckpointFamily:
    """The family of a single-file checkpoint, from its keys and the UNet's first width."""
    conv_in = shapes.get(_UNET_CONV_IN)
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ConfigError(
            f"{path} is an inpainting checkpoint (its UNet reads {conv_in[1]} channels, not 4); "
            "Imagine generates from text, so use the normal version of this model."
        )
    for entry in CHECKPOINT_FAMILIES:
        if entry.marker not in shapes:
            continue
        if entry.conv_in_width is None or (conv_in and conv_in[0] == entry.conv_in_width):
            return entry
    raise ConfigError(
        f"{path} is not a Stable Diffusion 1.x/2.x or SDXL checkpoint that Imagine can read "
        "(none of their text encoder keys is in it; an SDXL refiner or a UNet-only file "
        "cannot generate alone); use a diffusers folder or hub id for other models."
    )


def _tokenizer_vocabulary(settings: Settings) -> Path | None:
    """A folder holding the CLIP BPE files: the setting, else the Hugging Face cache."""
    folder = settings.clip_tokenizer
    if folder is not None:
        for candidate in (folder, folder / "tokenizer"):
            if (candidate / "tokenizer.json").is_file() or all(
                (candidate / name).is_file() for name in _VOCAB_FILES
            ):
                return candidate
        raise ConfigError(
            f"IMAGINE_CLIP_TOKENIZER is {folder}, which holds no vocab.json and merges.txt "
            "(nor a tokenizer.json); "
            "point it at the tokenizer folder of an SD 1.5 or SDXL diffusers model."
        )
    from huggingface_hub import try_to_load_from_cache

    for repo, prefix in _CACHED_TOKENIZERS:
        found = [try_to_load_from_cache(repo, prefix + name) for name in _VOCAB_FILES]
        if all(isinstance(file, str) for file in found):
            return Path(str(found[0])).parent
    return None


def _download_vocabulary(settings: Settings) -> Path | None:
    if not settings.allow_downloads:
        return None
    from huggingface_hub import hf_hub_download

    try:
        files = [hf_hub_download(_CACHED_TOKENIZERS[0][0], name) for name in _VOCAB_FILES]
    except Exception:
        return None
    return Path(files[0]).parent


def clip_tokenizers(entry: CheckpointFamily, config: Path, settings: Settings) -> dict[str, Any]:
    """The family's tokenizers: the CLIP vocabulary with the special tokens of our configs."""
    if not entry.tokenizers:
        return {}
    from transformers import CLIPTokenizer

    vocabulary = _tokenizer_vocabulary(settings) or _download_vocabulary(settings)
    if vocabulary is None:
        raise ConfigError(
            f"A {entry.family} checkpoint needs the CLIP tokenizer's vocabulary (vocab.json "
            "and merges.txt, 1.6 MB), which Imagine does not ship and did not find in the "
            "Hugging Face cache. Set IMAGINE_CLIP_TOKENIZER to a folder holding them (the "
            "tokenizer folder of any SD 1.5 or SDXL diffusers model), or run once with "
            "downloads allowed (IMAGINE_ALLOW_DOWNLOADS=true) to cache them."
        )
    tokenizers = {}
    for name in entry.tokenizers:
        special = json.loads((config / name / "tokenizer_config.json").read_text())
        special.pop("tokenizer_class", None)
        tokenizers[name] = CLIPTokenizer.from_pretrained(
            str(vocabulary), local_files_only=True, **special
        )
    return tokenizers


def load_single_file(path: Path, settings: Settings, dtype: torch.dtype) -> tuple[Any, str]:
    """The pipeline of a single-file checkpoint and its family's name, with no download
    where the family's configs ship with Imagine."""
    import diffusers
    from safetensors import SafetensorError

    entry = detect_checkpoint(path, read_header(path))
    pipe_class = getattr(diffusers, entry.pipeline)
    config = entry.config_folder(settings)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config is not None:
        kwargs |= {"config": str(config), "local_files_only": True}
        kwargs |= clip_tokenizers(entry, config, settings)
    elif not settings.allow_downloads:
        raise ConfigError(
            f"{path} is a {entry.family} checkpoint, whose configuration Imagine does not "
            "ship; allow downloads (IMAGINE_ALLOW_DOWNLOADS=true) so diffusers can fetch it, "
            "or convert the checkpoint to a diffusers folder."
        )
    try:
        pipe = pipe_class.from_single_file(str(path), **kwargs)
    except SafetensorError as exc:  # a header that reads, over tensors that do not
        raise _unreadable(path, exc) from None
    return pipe, entry.family
