"""Fitting images under Discord's upload limit.

A PNG that fits is sent as it is (it carries the recipe). One that does not is
re-encoded: WebP, then JPEG, quality stepped down, and as a last resort scaled
down, until it fits. The original always stays in the blob store.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from storage.errors import ImagineError

QUALITIES = (90, 80, 70, 60, 50, 40, 30)


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str
    reencoded: bool = False


def fit_upload(data: bytes, stem: str, limit: int) -> Upload:
    """The image as ``stem.png`` if it fits in ``limit`` bytes, else a smaller encoding."""
    if len(data) <= limit:
        return Upload(data, f"{stem}.png")
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    scale = 1.0
    while True:
        resized = image
        if scale < 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            resized = image.resize(size, Image.Resampling.LANCZOS)
        for quality in QUALITIES:
            for fmt, suffix in (("WEBP", "webp"), ("JPEG", "jpg")):
                buffer = io.BytesIO()
                resized.save(buffer, format=fmt, quality=quality)
                if buffer.tell() <= limit:
                    return Upload(buffer.getvalue(), f"{stem}.{suffix}", reencoded=True)
        scale *= 0.7
        if image.width * scale < 16 or image.height * scale < 16:
            raise ImagineError(
                f"The image cannot be made smaller than Discord's upload limit of {limit} bytes."
            )
