"""Cheap progress previews: a linear latent-to-RGB map, no VAE decode.

Factors are the widely used fits for the SD 1.x/2.x, SDXL, SD3 and FLUX latent
spaces (as published in ComfyUI's ``latent_formats``), keyed by a family's
``latent_format``; the tiny test models use their full-size family's.
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

# 16 channels, one row each (R, G, B).
_SD3_FACTORS = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)
_SD3_BIAS = (0.2394, 0.2135, 0.1925)
_FLUX_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
_FLUX_BIAS = (-0.0329, -0.0718, -0.0851)

_FACTORS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "sd15": (_SD_FACTORS, (0.0, 0.0, 0.0)),
    "sdxl": (_SDXL_FACTORS, _SDXL_BIAS),
    "sd3": (_SD3_FACTORS, _SD3_BIAS),
    "flux": (_FLUX_FACTORS, _FLUX_BIAS),
}

PREVIEW_SIDE = 256


def supports_preview(latent_format: str) -> bool:
    return latent_format in _FACTORS


def unpack_latent(packed: torch.Tensor, size: tuple[int, int], vae_scale: int) -> torch.Tensor:
    """One FLUX latent (tokens, 4 * channels) of an image of ``size`` (width, height) back
    to (channels, height, width): each token holds a 2x2 patch, as FluxPipeline packs it."""
    rows, columns = size[1] // (vae_scale * 2), size[0] // (vae_scale * 2)
    channels = packed.shape[-1] // 4
    grid = packed.reshape(rows, columns, channels, 2, 2)
    return grid.permute(2, 0, 3, 1, 4).reshape(channels, rows * 2, columns * 2)


def latent_preview(latent: torch.Tensor, latent_format: str) -> Image.Image:
    """An RGB approximation of one latent (channels, height, width)."""
    factors, bias = _FACTORS[latent_format]
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
