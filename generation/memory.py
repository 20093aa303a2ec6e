"""How a big model fits: everything on the GPU, CPU offload, and weight quantisation.

``IMAGINE_OFFLOAD`` (none | model | sequential) chooses diffusers' offload hooks;
``IMAGINE_QUANTIZE`` (none | int8 | float8) quantises the weights of the denoiser
and of a T5 text encoder through torchao (weight-only: activations keep the
model's dtype). Quantised weights give different pixels, so the recipe records
the quantisation; offload moves weights, not numbers, so it gives the same ones.

:func:`advise` is what ``imagine doctor`` says: the first option, cheapest in
speed first, whose weights fit the GPU it finds with room for activations.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storage.checkpoints import unreadable
from storage.errors import ConfigError
from storage.safetensors_header import HeaderError, read_header

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "model", "sequential")
QUANTIZATIONS = ("none", "int8", "float8")
DENOISERS = ("unet", "transformer")
# Parts quantised: the denoiser, and T5 encoders (billions of weights; CLIP's are few).
QUANTIZED_CLASSES = ("T5EncoderModel",)
GIB = 2**30
HEADROOM = 0.15  # of the weights, for activations, the VAE decode and the allocator
MIN_HEADROOM = 2 * GIB

# Weight-only configs by name, resolved lazily: torchao is an optional extra.
_TORCHAO_CONFIGS = {"int8": "Int8WeightOnlyConfig", "float8": "Float8WeightOnlyConfig"}


def quantized_parts(pipe: Any) -> list[str]:
    """The components of ``pipe`` that IMAGINE_QUANTIZE quantises."""
    parts = []
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        if name in DENOISERS or type(component).__name__ in QUANTIZED_CLASSES:
            parts.append(name)
    return parts


def quantize_weights(pipe: Any, quantization: str) -> list[str]:
    """Quantise ``pipe``'s denoiser and T5 weights in place; returns the parts quantised."""
    if quantization == "none":
        return []
    if quantization not in _TORCHAO_CONFIGS:
        raise ConfigError(
            f"IMAGINE_QUANTIZE {quantization!r} is not known; "
            f"use one of {', '.join(QUANTIZATIONS)}."
        )
    try:
        import torchao.quantization as torchao_quantization
    except ImportError:
        raise ConfigError(
            f"IMAGINE_QUANTIZE={quantization} needs torchao, which is not installed; install "
            "Imagine with its quantisation extra (pip install 'imagine[quantize]') or set "
            "IMAGINE_QUANTIZE=none."
        ) from None
    config = getattr(torchao_quantization, _TORCHAO_CONFIGS[quantization])()
    parts = quantized_parts(pipe)
    for name in parts:
        try:
            torchao_quantization.quantize_(getattr(pipe, name), config)
        except (RuntimeError, NotImplementedError, AssertionError) as exc:
            raise ConfigError(
                f"IMAGINE_QUANTIZE={quantization} could not quantise the {name} on this "
                f"device ({type(exc).__name__}: {exc}); float8 needs a GPU of compute capability "
                "8.9 or newer (L4, L40, H100): use int8, or IMAGINE_QUANTIZE=none."
            ) from None
    log.info("quantised %s to %s weights", ", ".join(parts), quantization)
    return parts


def place(pipe: Any, device: torch.device, offload: str) -> None:
    """Put ``pipe`` on ``device``, or behind the offload hooks that move it there."""
    if offload == "none":
        pipe.to(device)
        return
    if offload not in OFFLOAD_MODES:
        raise ConfigError(
            f"IMAGINE_OFFLOAD {offload!r} is not known; use one of {', '.join(OFFLOAD_MODES)}."
        )
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    log.info("%s CPU offload: weights stay in CPU memory until %s needs them", offload, device)


def check_offload(offload: str, device: torch.device) -> None:
    """Offload moves weights between CPU memory and an accelerator; refuse it without one."""
    if offload != "none" and device.type == "cpu":
        raise ConfigError(
            f"IMAGINE_OFFLOAD={offload} keeps weights in CPU memory until the GPU needs them, "
            "but this worker runs on the CPU, where they already are; set IMAGINE_OFFLOAD=none."
        )


def recipe_quantization(quantization: str) -> str | None:
    """What the recipe records: ``None`` for the weights as they are."""
    return None if quantization == "none" else quantization


# --- sizes, for ``imagine doctor`` --------------------------------------------------


def _header_parameters(path: Path) -> dict[str, int]:
    """Parameters per tensor of one .safetensors file, read from its header alone."""
    try:
        return read_header(path).parameters()
    except HeaderError as exc:
        raise unreadable(path, exc) from None


def _single_file_part(key: str) -> str:
    if key.startswith(("model.diffusion_model.", "diffusion_model.", "transformer.")):
        return "denoiser"
    if key.startswith(("first_stage_model.", "vae.")):
        return "vae"
    if key.startswith("text_encoders.t5xxl."):
        return "t5"
    return "text_encoder"


def _folder_part(folder: Path) -> str:
    if folder.name in DENOISERS:
        return "denoiser"
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") in {"t5", "umt5"}:
        return "t5"
    return folder.name


def parameter_counts(model_path: Path) -> dict[str, int]:
    """Parameters per part of a diffusers folder or a single checkpoint, from file headers
    (no weights read). Denoisers are named ``denoiser``, T5 encoders ``t5``."""
    counts: dict[str, int] = {}
    if model_path.is_file():
        for key, size in _header_parameters(model_path).items():
            part = _single_file_part(key)
            counts[part] = counts.get(part, 0) + size
        return counts
    for folder in sorted(p for p in model_path.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.safetensors")):
            part = _folder_part(folder)
            counts[part] = counts.get(part, 0) + sum(_header_parameters(file).values())
    return counts


@dataclass(frozen=True)
class Fit:
    offload: str
    quantize: str
    gpu_bytes: int  # what the GPU must hold at the peak
    fits: bool

    @property
    def settings(self) -> str:
        return f"IMAGINE_OFFLOAD={self.offload} IMAGINE_QUANTIZE={self.quantize}"


def _weight_bytes(parts: Mapping[str, int], dtype_bytes: int, quantize: str) -> dict[str, int]:
    quantized = {"denoiser", "t5"} if quantize != "none" else set()
    return {
        part: count * (1 if part in quantized else dtype_bytes) for part, count in parts.items()
    }


def _peak(weights: Mapping[str, int], offload: str) -> int:
    if offload == "none":
        held = sum(weights.values())
    elif offload == "model":
        held = max(weights.values(), default=0)  # one whole part on the GPU at a time
    else:
        held = max(weights.values(), default=0) // 8  # a layer at a time: a rough bound
    return held + max(MIN_HEADROOM, int(HEADROOM * held))


# Fastest first: offload costs transfers every call, int8 costs a little per matmul.
ORDER = (
    ("none", "none"),
    ("none", "int8"),
    ("model", "none"),
    ("model", "int8"),
    ("sequential", "none"),
    ("sequential", "int8"),
)


def fit(
    parts: Mapping[str, int], dtype_bytes: int, gpu_bytes: int, offload: str, quantize: str
) -> Fit:
    """What one memory option needs on the GPU at its peak, and whether that fits."""
    peak = _peak(_weight_bytes(parts, dtype_bytes, quantize), offload)
    return Fit(offload, quantize, peak, peak <= gpu_bytes)


def options(parts: Mapping[str, int], dtype_bytes: int, gpu_bytes: int) -> list[Fit]:
    """Every memory option, fastest first, with what it needs on the GPU."""
    return [fit(parts, dtype_bytes, gpu_bytes, *option) for option in ORDER]


def advise(parts: Mapping[str, int], dtype_bytes: int, gpu_bytes: int) -> tuple[Fit | None, str]:
    """The fastest option that fits the GPU, and the sentence ``imagine doctor`` prints."""
    total = sum(parts.values()) * dtype_bytes
    choices = options(parts, dtype_bytes, gpu_bytes)
    best = next((fit for fit in choices if fit.fits), None)
    have = f"{gpu_bytes / GIB:.0f} GiB GPU"
    weights = f"{total / GIB:.1f} GiB of weights"
    if best is None:
        return None, (
            f"{weights} do not fit a {have} even with sequential offload and int8 weights "
            f"(needs about {choices[-1].gpu_bytes / GIB:.1f} GiB); use a bigger GPU or a "
            "smaller model"
        )
    if best.offload == "none" and best.quantize == "none":
        return best, f"{weights} fit the {have} whole (IMAGINE_OFFLOAD=none)"
    note = " (int8 weights change the pixels: recipes say so)" if best.quantize != "none" else ""
    return best, (
        f"{weights} do not fit the {have} whole; {best.settings} needs about "
        f"{best.gpu_bytes / GIB:.1f} GiB{note}"
    )
