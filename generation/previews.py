"""Cheap progress previews: a linear latent-to-RGB map, no VAE decode.

Factors are the widely used fits for the SD 1.x/2.x, SDXL, SD3 and FLUX latent
spaces (as published in ComfyUI's ``latent_formats``), keyed by a family's
``latent_format``; the tiny test models use their full-size family's.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from PIL import Image

log = logging.getLogger(__name__)

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
MAX_PENDING_PREVIEWS = 2  # per run; when more are still on their way, a step has none
# One thread: previews reach their listener in the order they were taken.
PREVIEW_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagine-preview")


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
    return preview_image(preview_pixels(latent, latent_format).cpu())


@functools.cache
def _factors_on(latent_format: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: copying them up at every preview would wait for the GPU.
    factors, bias = _FACTORS[latent_format]
    weights = torch.tensor(factors, dtype=torch.float32, device=device)
    return weights, torch.tensor(bias, dtype=torch.float32, device=device).view(3, 1, 1)


def preview_pixels(latent: torch.Tensor, latent_format: str) -> torch.Tensor:
    """The preview's uint8 pixels (3, height, width), computed where ``latent`` lives: on a
    GPU a few small kernels queued behind the step, no wait for them."""
    weights, bias = _factors_on(latent_format, latent.device)
    rgb = torch.einsum("chw,cr->rhw", latent.detach().float(), weights) + bias
    return ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8)


def preview_image(pixels: torch.Tensor) -> Image.Image:
    """The picture of :func:`preview_pixels` (on the CPU), at least ``PREVIEW_SIDE`` wide."""
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


class AsyncPreviews:
    """Previews of one run, made beside its denoising loop, which never waits for them.

    At a step the loop only queues the latent-to-RGB kernels and, on a GPU, a copy of the
    small result to pinned host memory; a thread waits for that copy, encodes the JPEG
    and hands it to ``deliver(step, total, jpeg)``. When previews fall behind, a step has none.
    """

    def __init__(self, family: str, deliver: Callable[[int, int, bytes], None]) -> None:
        self.family = family
        self.deliver = deliver
        self._pending: list[Future[None]] = []

    def offer(self, step: int, total: int, latent: torch.Tensor) -> bool:
        """Start the preview of ``latent`` at ``step``; False if it was skipped."""
        self._pending = [pending for pending in self._pending if not pending.done()]
        if len(self._pending) >= MAX_PENDING_PREVIEWS:
            return False
        pixels = preview_pixels(latent, self.family)
        ready: torch.cuda.Event | None = None
        if pixels.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = pixels.cpu()  # the CPU: the same tensor
        self._pending.append(PREVIEW_THREAD.submit(self._finish, step, total, host, ready))
        return True

    def _finish(
        self, step: int, total: int, host: torch.Tensor, ready: torch.cuda.Event | None
    ) -> None:
        try:
            if ready is not None:
                ready.synchronize()  # this thread waits for the copy, not the loop
            self.deliver(step, total, preview_bytes(preview_image(host)))
        except Exception:
            log.exception("the preview of step %d was lost", step)


def wait_for_previews() -> None:
    """Return once every preview offered so far has been delivered (or lost)."""
    PREVIEW_THREAD.submit(lambda: None).result()
