"""Cheap progress previews: a linear latent-to-RGB map, no VAE decode.

Factors are the widely used fits for the SD 1.x/2.x and SDXL latent spaces
(as in ComfyUI's ``latent_formats``); the tiny test models reuse SD's.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

_SD_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)

_FACTORS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "sd15": (_SD_FACTORS, (0.0, 0.0, 0.0)),
    "sd2": (_SD_FACTORS, (0.0, 0.0, 0.0)),
    "tiny-sd": (_SD_FACTORS, (0.0, 0.0, 0.0)),
    "sdxl": (_SDXL_FACTORS, _SDXL_BIAS),
    "tiny-sdxl": (_SDXL_FACTORS, _SDXL_BIAS),
}

PREVIEW_SIDE = 256


def supports_preview(family: str) -> bool:
    return family in _FACTORS


def latent_preview(latent: torch.Tensor, family: str) -> Image.Image:
    """An RGB approximation of one latent (channels, height, width)."""
    factors, bias = _FACTORS[family]
    weights = torch.tensor(factors, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", latent.detach().float().cpu(), weights)
    rgb = rgb + torch.tensor(bias).view(3, 1, 1)
    pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8)
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
    scale = PREVIEW_SIDE / max(image.size)
    if scale > 1:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR
        )
    return image


def preview_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()
