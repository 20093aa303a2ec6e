"""Images from strangers, made safe: checked, decoded once, normalised, stored as a plain PNG.

What members upload (an image prompt today; a ControlNet source next) comes through
:func:`intake_image` before anything is queued:

- only PNG, JPEG, WebP and GIF are opened (an SVG or HTML page renamed ``.png`` is not
  one of them), and never more than ``max_bytes``;
- the size in the header is checked against ``max_pixels`` before any pixel is decoded
  (Pillow's own decompression-bomb limit stays in force beneath it);
- a damaged or cut-short file is refused rather than half read;
- an animation gives its first frame, the EXIF orientation is applied, transparency is
  flattened onto white, and the result is RGB at most :data:`STORED_MAX_SIDE` on a side;
- what is kept is a PNG of those pixels without any metadata (no EXIF, no GPS position).

The PNG goes into the content-addressed blob store, and recipes name it by an
:class:`~storage.recipe.ImageRef` (key, sha256, size): the worker reads those exact
pixels back with :func:`open_stored`, so a recipe reproduces bit for bit.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from storage.errors import ImagineError
from storage.recipe import ImageRef

if TYPE_CHECKING:
    from storage.blobs import BlobStore
    from storage.settings import Settings

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
STORED_MAX_SIDE = 2048
FLATTEN_ON = (255, 255, 255)
_ACCEPTED = "PNG, JPEG, WebP or GIF"


class ImageRefused(ImagineError):
    """An image Imagine will not take; the message says what to do instead."""


@dataclass(frozen=True)
class IntakeLimits:
    max_bytes: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> IntakeLimits:
        return cls(
            max_bytes=settings.image_max_mb * 2**20,
            max_pixels=int(settings.image_max_megapixels * 1_000_000),
        )

    def check_size(self, size: int, what: str = "The image") -> None:
        """Refuse ``size`` bytes before they are downloaded."""
        if size > self.max_bytes:
            raise ImageRefused(
                f"{what} is {_mib(size)}; Imagine takes images up to {_mib(self.max_bytes)}. "
                "Send a smaller file (a JPEG or a smaller PNG)."
            )


@dataclass(frozen=True)
class IntakeImage:
    """An upload as it is kept: PNG bytes of RGB pixels."""

    png: bytes
    width: int
    height: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png).hexdigest()


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def decode_image(data: bytes, limits: IntakeLimits, what: str = "The image") -> Image.Image:
    """``data`` as RGB pixels, or :class:`ImageRefused` with a sentence saying why not."""
    limits.check_size(len(data), what)
    unreadable = ImageRefused(
        f"{what} could not be read: it is not a {_ACCEPTED} image, or it is damaged or cut "
        "short. Send the picture as a PNG or JPEG file."
    )
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise _too_many_pixels(what, None, limits) from None
    except Exception:  # Pillow raises many kinds on hostile bytes; all mean "not an image"
        raise unreadable from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise unreadable
        if width * height > limits.max_pixels:
            raise _too_many_pixels(what, (width, height), limits)
        try:
            if image.format == "JPEG":  # decode big photos at a reduced scale: less memory
                image.draft("RGB", (STORED_MAX_SIDE, STORED_MAX_SIDE))
            image.seek(0)  # an animation: its first frame
            image.load()
            oriented = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError:
            raise _too_many_pixels(what, (width, height), limits) from None
        except Exception:
            raise unreadable from None
    return _bounded(_flattened(oriented))


def _too_many_pixels(what: str, size: tuple[int, int] | None, limits: IntakeLimits) -> ImageRefused:
    allowed = f"{limits.max_pixels / 1e6:g} megapixels"
    if size is None:
        return ImageRefused(f"{what} has far too many pixels; Imagine takes up to {allowed}.")
    width, height = size
    return ImageRefused(
        f"{what} is {width}×{height} ({width * height / 1e6:.1f} megapixels); Imagine takes "
        f"up to {allowed}. Resize it and send it again."
    )


def _flattened(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto :data:`FLATTEN_ON`."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*FLATTEN_ON, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: to 8 bits first
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")


def _bounded(image: Image.Image) -> Image.Image:
    longest = max(image.size)
    if longest <= STORED_MAX_SIDE:
        return image
    scale = STORED_MAX_SIDE / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def intake_image(data: bytes, limits: IntakeLimits, what: str = "The image") -> IntakeImage:
    """Check and normalise an upload; the PNG to keep. CPU work: run it on a thread."""
    image = decode_image(data, limits, what)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return IntakeImage(buffer.getvalue(), image.width, image.height)


async def store_image(blobs: BlobStore, image: IntakeImage) -> ImageRef:
    """Put the normalised image into the blob store; the reference a recipe keeps."""
    key = await blobs.put(image.png)
    return ImageRef(blob_key=key, sha256=image.sha256, width=image.width, height=image.height)


def open_stored(data: bytes, ref: ImageRef) -> Image.Image:
    """The pixels of a stored image, checked against the recipe's hash."""
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise ImagineError(
            f"The stored image {ref.blob_key[:12]} does not match its recipe's hash; "
            "it was changed or damaged, so this recipe cannot be reproduced."
        )
    with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
        return image.convert("RGB")


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` cropped about its centre to the shape ``width``:``height``, then resized
    to exactly that size (the generation's, when an ``--ar`` differs from the image's)."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
