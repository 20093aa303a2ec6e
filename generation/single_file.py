"""Single-file checkpoints, as Civitai ships them, loaded with no network.

A checkpoint in the original key layout (``model.diffusion_model.…``,
``first_stage_model.…``, ``cond_stage_model.…`` or ``conditioner.embedders.…``)
holds weights only. diffusers' ``from_single_file`` would fetch the family's
diffusers configs and tokenizers from the hub; here the family is detected from the
keys (storage/checkpoints.py, one entry per family), its configs are shipped in
``single_file_configs/<family>/`` (or are the tiny model's own folder), and the CLIP
tokenizer's vocabulary comes from a local folder or the Hugging Face cache.

A FLUX transformer is read at the file's own sizes (generation/flux_checkpoint.py); a
file holding it alone, as Black Forest Labs ships FLUX.1, takes its autoencoder, text
encoders and tokenizers from a FLUX diffusers folder (IMAGINE_SINGLE_FILE_COMPONENTS, or
a cached FLUX.1), never downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from generation.flux_checkpoint import (
    convert_flux_transformer,
    flux_transformer_config,
    transformer_keys,
)
from generation.tiny import ensure_tiny_model
from storage.checkpoints import CheckpointFamily, detect_checkpoint, read_shapes, unreadable
from storage.errors import ConfigError
from storage.families import file_family
from storage.settings import Settings

CONFIGS = Path(__file__).parent / "single_file_configs"
# Hub repositories whose cached tokenizer files serve every CLIP-L/bigG tokenizer: the
# BPE vocabulary is the same, only the special tokens differ (they come from our configs).
_CACHED_TOKENIZERS = (
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer/"),
)
_VOCAB_FILES = ("vocab.json", "merges.txt")
# Hub repositories whose cached T5 (v1.1 XXL) sentencepiece model serves SD3 and FLUX.
_CACHED_T5 = (
    ("google/t5-v1_1-xxl", ""),
    ("black-forest-labs/FLUX.1-schnell", "tokenizer_2/"),
    ("black-forest-labs/FLUX.1-dev", "tokenizer_2/"),
    ("stabilityai/stable-diffusion-3.5-medium", "tokenizer_3/"),
    ("stabilityai/stable-diffusion-3.5-large", "tokenizer_3/"),
    ("stabilityai/stable-diffusion-3.5-large-turbo", "tokenizer_3/"),
    ("stabilityai/stable-diffusion-3-medium-diffusers", "tokenizer_3/"),
)
_T5_FILES = ("spiece.model", "tokenizer.json")
# The T5 encoder in an all-in-one SD3 or FLUX file (what diffusers looks for, too).
_T5_WEIGHT = "text_encoders.t5xxl.transformer.shared.weight"
# A FLUX file holding the transformer alone takes the rest from a FLUX diffusers model:
# dev and schnell share their autoencoder, text encoders and tokenizers.
_FLUX_REPOS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
_FLUX_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def config_folder(entry: CheckpointFamily, settings: Settings) -> Path | None:
    """Where the family's diffusers configs are: the tiny model's folder, or shipped here."""
    if entry.tiny_model is not None:
        return ensure_tiny_model(entry.tiny_model, settings.data_dir / "models")
    folder = CONFIGS / (entry.configs or entry.family)
    return folder if (folder / "model_index.json").is_file() else None


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


def _t5_vocabulary(settings: Settings) -> Path | None:
    """A folder holding T5's sentencepiece model: the setting, else the Hugging Face cache."""
    folder = settings.t5_tokenizer
    if folder is not None:
        for candidate in (folder, folder / "tokenizer_2", folder / "tokenizer_3"):
            if any((candidate / name).is_file() for name in _T5_FILES):
                return candidate
        raise ConfigError(
            f"IMAGINE_T5_TOKENIZER is {folder}, which holds no spiece.model (nor a "
            "tokenizer.json); point it at the tokenizer_2 folder of a FLUX diffusers model "
            "or the tokenizer_3 folder of an SD3 one."
        )
    from huggingface_hub import try_to_load_from_cache

    for repo, prefix in _CACHED_T5:
        for name in _T5_FILES:
            found = try_to_load_from_cache(repo, prefix + name)
            if isinstance(found, str):
                return Path(found).parent
    return None


def _no_t5_vocabulary(entry: CheckpointFamily) -> ConfigError:
    return ConfigError(
        f"A {entry.family} checkpoint needs the T5 tokenizer (spiece.model, 0.8 MB), which "
        "Imagine does not ship and did not find in the Hugging Face cache. Set "
        "IMAGINE_T5_TOKENIZER to a folder holding it (the tokenizer_2 folder of a FLUX "
        "diffusers model, or tokenizer_3 of an SD3 one)."
    )


def _no_components(path: Path, entry: CheckpointFamily) -> ConfigError:
    if entry.pipeline == "FluxPipeline":
        return ConfigError(
            f"{path} holds the {entry.family} transformer alone; its autoencoder, text encoders "
            "and tokenizers come from a FLUX diffusers model, and none is in the Hugging Face "
            "cache. Set IMAGINE_SINGLE_FILE_COMPONENTS to a FLUX.1 diffusers folder (or a "
            "cached hub id such as black-forest-labs/FLUX.1-schnell), or use an all-in-one "
            "checkpoint."
        )
    return ConfigError(
        f"{path} holds the {entry.family} transformer only, without the autoencoder and "
        "text encoders that generating needs; use a checkpoint that includes them (Civitai "
        "lists them as 'full' or 'fp8 all-in-one'), or the model's diffusers folder."
    )


def _cached_snapshot(repo: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (OSError, ValueError):  # not cached, or not a hub id
        return None


def _holds_flux_parts(folder: Path) -> bool:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return index.get("_class_name") == "FluxPipeline" and all(
        (folder / part).is_dir() for part in _FLUX_PARTS
    )


def flux_components(entry: CheckpointFamily, settings: Settings) -> Path | None:
    """The FLUX diffusers folder whose autoencoder, text encoders and tokenizers complete a
    transformer-only file: the tiny model's own, the setting, else a cached FLUX.1."""
    if entry.tiny_model is not None:
        return config_folder(entry, settings)
    chosen = settings.single_file_components
    if chosen:
        folder = Path(chosen).expanduser()
        found = folder if folder.is_dir() else _cached_snapshot(chosen)
        if found is None or not _holds_flux_parts(found):
            raise ConfigError(
                f"IMAGINE_SINGLE_FILE_COMPONENTS is {chosen}, which is neither a FLUX diffusers "
                f"folder (model_index.json and {', '.join(_FLUX_PARTS)}) nor such a model in "
                "the Hugging Face cache; point it at one."
            )
        return found
    for repo in _FLUX_REPOS:
        found = _cached_snapshot(repo)
        if found is not None and _holds_flux_parts(found):
            return found
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


def _no_vocabulary(entry: CheckpointFamily) -> ConfigError:
    return ConfigError(
        f"A {entry.family} checkpoint needs the CLIP tokenizer's vocabulary (vocab.json "
        "and merges.txt, 1.6 MB), which Imagine does not ship and did not find in the "
        "Hugging Face cache. Set IMAGINE_CLIP_TOKENIZER to a folder holding them (the "
        "tokenizer folder of any SD 1.5 or SDXL diffusers model), or run once with "
        "downloads allowed (IMAGINE_ALLOW_DOWNLOADS=true) to cache them."
    )


def _no_configs(path: Path, entry: CheckpointFamily) -> ConfigError:
    return ConfigError(
        f"{path} is a {entry.family} checkpoint, whose configuration Imagine does not "
        "ship; allow downloads (IMAGINE_ALLOW_DOWNLOADS=true) so diffusers can fetch it, "
        "or convert the checkpoint to a diffusers folder."
    )


def describe_single_file(path: Path, settings: Settings) -> str:
    """What ``imagine doctor`` says of a checkpoint file, without loading it;
    :class:`ConfigError` if it cannot load as things stand."""
    shapes = read_shapes(path)
    entry = detect_checkpoint(path, shapes)
    family = file_family(entry, path).name
    if entry.pipeline == "FluxPipeline" and not _has_components(shapes):
        components = flux_components(entry, settings)
        if components is None:
            raise _no_components(path, entry)
        _flux_config(path, shapes, entry, settings)
        return f"a {family} transformer, completed by {components}; loadable offline"
    if entry.tiny_model is None and config_folder(entry, settings) is None:
        if not settings.allow_downloads:
            raise _no_configs(path, entry)
        return f"a {family} checkpoint; its configuration is downloaded at start"
    _refuse_without_encoders(path, shapes, entry)
    if entry.tokenizers and _tokenizer_vocabulary(settings) is None:
        if not settings.allow_downloads:
            raise _no_vocabulary(entry)
        return f"a {family} checkpoint; the CLIP tokenizer is downloaded at start"
    if entry.t5_tokenizer and entry.tiny_model is None and _t5_vocabulary(settings) is None:
        raise _no_t5_vocabulary(entry)
    return f"a {family} checkpoint, loadable offline"


def _refuse_without_encoders(
    path: Path, shapes: dict[str, list[int]], entry: CheckpointFamily
) -> None:
    """An all-in-one file must hold its autoencoder and every text encoder: diffusers takes
    a part missing from the file from the config folder, which holds no weights."""
    if entry.tiny_model is not None or not entry.t5_tokenizer:
        return
    if not _has_components(shapes):
        raise _no_components(path, entry)
    if _T5_WEIGHT not in shapes:
        raise ConfigError(
            f"{path} holds the {entry.family} transformer and CLIP encoders but not the T5 "
            "encoder (text_encoders.t5xxl…) that Imagine reads prompts with; use the version "
            "of the file that includes T5 (for SD 3 medium, sd3_medium_incl_clips_t5xxlfp8), "
            "or the model's diffusers folder."
        )


def _has_components(shapes: dict[str, list[int]]) -> bool:
    """Whether a checkpoint holds an autoencoder and text encoders besides the denoiser."""
    return any(key.startswith(("first_stage_model.", "vae.")) for key in shapes) and any(
        key.startswith(("text_encoders.", "cond_stage_model.", "conditioner.")) for key in shapes
    )


def t5_tokenizer(entry: CheckpointFamily, config: Path, settings: Settings) -> dict[str, Any]:
    """The family's T5 tokenizer, from its sentencepiece model and our config's length."""
    if entry.t5_tokenizer is None or entry.tiny_model is not None:
        return {}
    from transformers import T5Tokenizer

    vocabulary = _t5_vocabulary(settings)
    if vocabulary is None:
        raise _no_t5_vocabulary(entry)
    special = json.loads((config / entry.t5_tokenizer / "tokenizer_config.json").read_text())
    special.pop("tokenizer_class", None)
    tokenizer = T5Tokenizer.from_pretrained(str(vocabulary), local_files_only=True, **special)
    return {entry.t5_tokenizer: tokenizer}


def clip_tokenizers(entry: CheckpointFamily, config: Path, settings: Settings) -> dict[str, Any]:
    """The family's tokenizers: the CLIP vocabulary with the special tokens of our configs."""
    if not entry.tokenizers:
        return {}
    from transformers import CLIPTokenizer

    vocabulary = _tokenizer_vocabulary(settings) or _download_vocabulary(settings)
    if vocabulary is None:
        raise _no_vocabulary(entry)
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
    from safetensors import SafetensorError

    shapes = read_shapes(path)
    entry = detect_checkpoint(path, shapes)
    try:
        if entry.pipeline == "FluxPipeline":
            pipe = _load_flux(path, shapes, entry, settings, dtype)
        else:
            pipe = _load_with_configs(path, shapes, entry, settings, dtype)
    except SafetensorError as exc:  # a header that reads, over tensors that do not
        raise unreadable(path, exc) from None
    _tie_t5_embeddings(pipe)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # diffusers' T5 from a single file is left training: dropout on
    return pipe, file_family(entry, path).name


def _load_with_configs(
    path: Path,
    shapes: dict[str, list[int]],
    entry: CheckpointFamily,
    settings: Settings,
    dtype: torch.dtype,
) -> Any:
    import diffusers

    _refuse_without_encoders(path, shapes, entry)
    pipe_class = getattr(diffusers, entry.pipeline)
    config = config_folder(entry, settings)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config is not None:
        kwargs |= {"config": str(config), "local_files_only": True}
        kwargs |= clip_tokenizers(entry, config, settings)
        kwargs |= t5_tokenizer(entry, config, settings)
    elif not settings.allow_downloads:
        raise _no_configs(path, entry)
    return pipe_class.from_single_file(str(path), **kwargs)


def _flux_config(
    path: Path, shapes: dict[str, list[int]], entry: CheckpointFamily, settings: Settings
) -> dict[str, Any]:
    """The transformer's config, sized from the file's tensors."""
    folder = config_folder(entry, settings)
    if folder is None:
        raise _no_configs(path, entry)
    base = json.loads((folder / "transformer" / "config.json").read_text())
    keys = transformer_keys(shapes)
    return flux_transformer_config({key: shapes[key] for key in keys}, base, path)


def _load_flux(
    path: Path,
    shapes: dict[str, list[int]],
    entry: CheckpointFamily,
    settings: Settings,
    dtype: torch.dtype,
) -> Any:
    """A FLUX pipeline whose transformer is read at the file's own width (diffusers'
    conversion assumes FLUX.1's); the rest from the same file, or from a FLUX diffusers
    model when the file holds the transformer alone."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors import safe_open

    components = None
    if not _has_components(shapes):
        components = flux_components(entry, settings)
        if components is None:
            raise _no_components(path, entry)
    else:
        _refuse_without_encoders(path, shapes, entry)  # as describe_single_file does
    config = _flux_config(path, shapes, entry, settings)
    folder = config_folder(entry, settings)
    assert folder is not None  # _flux_config refused a family without configs
    with safe_open(str(path), framework="pt") as checkpoint:
        state = {key: checkpoint.get_tensor(key).to(dtype) for key in transformer_keys(shapes)}
    with torch.device("meta"):  # no random weights first: FLUX.1 has 12 billion
        transformer: Any = FluxTransformer2DModel(**config)
    transformer.load_state_dict(
        convert_flux_transformer(state, config, path), strict=True, assign=True
    )
    if components is None:
        kwargs: dict[str, Any] = {"config": str(folder), "local_files_only": True}
        kwargs |= clip_tokenizers(entry, folder, settings) | t5_tokenizer(entry, folder, settings)
        return FluxPipeline.from_single_file(
            str(path), transformer=transformer, dtype=dtype, **kwargs
        )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder / "scheduler"))
    return FluxPipeline.from_pretrained(
        str(components),
        transformer=transformer,
        scheduler=scheduler,
        dtype=dtype,
        local_files_only=True,
    )


def _tie_t5_embeddings(pipe: Any) -> None:
    """Tie each T5 encoder's input embedding to ``shared``, as its config says: Stability's
    files hold ``shared.weight`` only, and diffusers' single-file loader leaves the tied
    copy unloaded (on the meta device)."""
    for component in pipe.components.values():
        encoder: Any = getattr(component, "encoder", None)
        shared = getattr(component, "shared", None)
        embed = getattr(encoder, "embed_tokens", None)
        if (
            isinstance(shared, torch.nn.Embedding)
            and isinstance(embed, torch.nn.Embedding)
            and embed.weight.is_meta
        ):
            encoder.embed_tokens = shared
