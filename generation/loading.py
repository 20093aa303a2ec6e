"""Finding and loading a base model: hub id, local diffusers folder, or single checkpoint.

Everything goes through diffusers' AutoPipeline classes (or the family's
``from_single_file``) so that SD 1.x/2.x, SDXL and the tiny test models share
one path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoPipelineForText2Image

from generation.memory import check_offload, place, quantize_weights, recipe_quantization
from generation.single_file import load_single_file
from generation.tiny import TINY_MODELS, ensure_tiny_model
from storage.errors import ConfigError, ImagineError
from storage.families import (
    FAMILIES,
    PIPELINE_FAMILIES,
    TINY_FAMILIES,
    ModelFamily,
    variant_family,
)
from storage.settings import Settings

# Only what a pipeline needs: skips root-level single-file checkpoints and other formats.
_HUB_FILES = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]


# diffusers pipelines are assembled dynamically; their static types do not line up.
Pipeline = Any


class ModelNotFound(ImagineError):
    """The configured model is neither on disk nor obtainable."""


@dataclass(frozen=True)
class ModelSource:
    model: str  # as configured
    kind: str  # tiny | folder | single_file | hub
    path: Path


@dataclass(frozen=True)
class LoadedModel:
    pipe: Pipeline
    source: ModelSource
    family: ModelFamily
    model_hash: str
    device: torch.device
    dtype: torch.dtype
    quantization: str | None = None  # IMAGINE_QUANTIZE, as the recipe records it
    offload: str = "none"  # IMAGINE_OFFLOAD


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        try:
            device = torch.device(setting)
        except RuntimeError:
            raise ConfigError(
                f"IMAGINE_DEVICE {setting!r} is not a torch device; use auto, cuda, cuda:N, "
                "mps or cpu."
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"IMAGINE_DEVICE is {setting!r} but this machine has no usable CUDA GPU; "
                "set it to auto or cpu."
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        dtype: torch.dtype = getattr(torch, setting)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def _hub_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def _not_found(model: str, looked: str, reason: str) -> ModelNotFound:
    fetch = f"Download it on a connected machine with `hf download {model}`, or set"
    if model.startswith((".", "/", "~")) or model.endswith(".safetensors"):  # a path
        fetch = "Check the path, or set"
    return ModelNotFound(
        f"The model {model!r} was not found ({reason}); looked in {looked}. {fetch} "
        "IMAGINE_MODEL to a local diffusers folder or .safetensors checkpoint, or try "
        "Imagine offline with --model tiny."
    )


def resolve_source(model: str, settings: Settings) -> ModelSource:
    """Where the weights of ``model`` are on this machine (fetching hub models if allowed)."""
    if model in TINY_MODELS:
        return ModelSource(model, "tiny", ensure_tiny_model(model, settings.data_dir / "models"))
    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or path.suffix in {".safetensors", ".ckpt"}
    if path.exists() or looks_like_path:
        if path.suffix in {".ckpt", ".pt", ".bin", ".pth"}:
            raise ConfigError(
                f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors or use a diffusers folder."
            )
        if path.is_file() and path.suffix == ".safetensors":
            return ModelSource(model, "single_file", path)
        if (path / "model_index.json").is_file():
            return ModelSource(model, "folder", path)
        raise _not_found(
            model, str(path), "no .safetensors file or diffusers folder (model_index.json) there"
        )
    return ModelSource(model, "hub", _snapshot(model, settings))


def resolve_folder(model: str, settings: Settings, patterns: list[str]) -> Path:
    """A local folder of ``model`` (a ControlNet, a preprocessor's model): itself when it is
    a folder, else the hub snapshot of the files matching ``patterns``."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.startswith((".", "/", "~")):
        raise _not_found(model, str(path), "no such folder")
    return _snapshot(model, settings, patterns)


def _snapshot(repo_id: str, settings: Settings, patterns: list[str] = _HUB_FILES) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except HFValidationError:
        raise _not_found(repo_id, "the local disk", "it is not a path or a hub id") from None
    except Exception as offline:
        if not settings.allow_downloads:
            raise _not_found(
                repo_id, _hub_cache(), f"not in the cache and downloads are off: {offline}"
            ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise _not_found(
            repo_id, f"{_hub_cache()} and the Hugging Face hub", type(exc).__name__
        ) from None


def detect_family(pipe: Pipeline, source: ModelSource) -> ModelFamily:
    """The family of the loaded pipeline: its class, then its weights, then its name."""
    if source.kind == "tiny":
        return FAMILIES[TINY_FAMILIES[source.model]]
    base = PIPELINE_FAMILIES.get(type(pipe).__name__)
    if base is None:
        raise ConfigError(
            f"{source.model} loads as a {type(pipe).__name__}, which Imagine does not run; "
            "use a Stable Diffusion 1.x/2.x, SDXL, SD 3 or FLUX.1 text-to-image model."
        )
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if unet is not None and vae is not None:
        takes, latents = unet.config.get("in_channels"), vae.config.get("latent_channels")
        if takes != latents:  # 9 for inpainting (latents, mask, masked image)
            raise ConfigError(
                f"{source.model} is not a text-to-image model: its UNet takes {takes} "
                f"channels, not its autoencoder's {latents} (an inpainting model takes 9); "
                "use the base model it was made from."
            )
    if base == "flux" and not pipe.transformer.config.get("guidance_embeds", True):
        return FAMILIES["flux-schnell"]  # no guidance embedding: the distilled 4-step model
    if base == "sd15":
        cross_attention = getattr(getattr(pipe, "unet", None), "config", {}).get(
            "cross_attention_dim"
        )
        return FAMILIES["sd2" if cross_attention == 1024 else "sd15"]
    return variant_family(base, source.model)


def model_hash(source: ModelSource, cache_dir: Path) -> str:
    """sha256 (first 10 hex digits, as A1111 shows) of the denoiser's weights.

    Hashing gigabytes takes seconds, so hashes are cached by path, size and mtime.
    """
    if source.kind == "single_file":
        files = [source.path]
    else:
        denoiser = next(
            (
                source.path / part
                for part in ("unet", "transformer")
                if (source.path / part).is_dir()
            ),
            source.path,
        )
        files = sorted(denoiser.glob("*.safetensors")) or sorted(denoiser.glob("*.bin"))
    cache_file = cache_dir / "model-hashes.json"
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    fingerprint = ";".join(
        f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files
    )
    if fingerprint in cache:
        return cache[fingerprint]
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    value = digest.hexdigest()[:10]
    cache[fingerprint] = value
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".tmp-{os.getpid()}")
        temporary.write_text(json.dumps(cache, indent=1))
        temporary.replace(cache_file)
    except OSError:
        pass  # a read-only cache only costs the hashing time next start
    return value


def quiet_libraries() -> None:
    """Silence library progress bars and advice; Imagine reports progress itself."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()


def load_upscaler(settings: Settings, device: torch.device, dtype: torch.dtype) -> Pipeline:
    """The dedicated upscaler named by ``IMAGINE_UPSCALER``."""
    from diffusers import DiffusionPipeline

    assert settings.upscaler is not None
    source = resolve_source(settings.upscaler, settings)
    if source.kind == "single_file":
        raise ConfigError(
            f"IMAGINE_UPSCALER {settings.upscaler!r} is a single file; "
            "an upscaler must be a diffusers folder or hub id."
        )
    pipe = DiffusionPipeline.from_pretrained(str(source.path), dtype=dtype)
    if "Upscale" not in type(pipe).__name__:
        raise ConfigError(
            f"IMAGINE_UPSCALER {settings.upscaler!r} is a {type(pipe).__name__}, not an "
            "upscaling pipeline; use e.g. stabilityai/stable-diffusion-x4-upscaler."
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_model(settings: Settings, model: str | None = None) -> LoadedModel:
    """Load the configured base model onto the chosen device, ready to run."""
    quiet_libraries()
    source = resolve_source(model or settings.model, settings)
    device = pick_device(settings.device)
    check_offload(settings.offload, device)
    dtype = pick_dtype(settings.dtype, device)
    if source.kind == "single_file":
        pipe, family_name = load_single_file(source.path, settings, dtype)
        family = FAMILIES[family_name]
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(str(source.path), dtype=dtype)
        family = detect_family(pipe, source)
    if settings.offload == "none":
        pipe.to(device)  # quantised where the kernels will run
    quantize_weights(pipe, settings.quantize)
    if settings.offload != "none":
        place(pipe, device, settings.offload)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(
        pipe=pipe,
        source=source,
        family=family,
        model_hash=model_hash(source, settings.data_dir / "cache"),
        device=device,
        dtype=dtype,
        quantization=recipe_quantization(settings.quantize),
        offload=settings.offload,
    )
