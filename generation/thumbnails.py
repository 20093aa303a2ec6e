"""WebP thumbnails for the web gallery: encoded beside the PNGs when a job's images are
stored, and by ``imagine thumbnails`` for images made before. Torch-free."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Sequence
from concurrent.futures import Executor

from PIL import Image

from storage.blobs import BlobStore
from storage.database import Database
from storage.errors import BlobNotFound
from storage.thumbnails import (
    THUMBNAIL_SIZES,
    NewThumbnail,
    images_missing_thumbnails,
    record_thumbnails,
    thumbnail_dimensions,
)

log = logging.getLogger(__name__)
WEBP_QUALITY = 82


def encode_thumbnails(
    image: Image.Image, sizes: Sequence[int] = THUMBNAIL_SIZES
) -> list[tuple[int, int, int, bytes]]:
    """(size, width, height, WebP bytes) for each size; CPU work, run off the event loop."""
    rgb = image.convert("RGB")
    encoded = []
    for size in sizes:
        width, height = thumbnail_dimensions(rgb.width, rgb.height, size)
        small = (
            rgb
            if (width, height) == rgb.size
            else rgb.resize((width, height), Image.Resampling.LANCZOS)
        )
        buffer = io.BytesIO()
        small.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=4)
        encoded.append((size, width, height, buffer.getvalue()))
    return encoded


async def store_thumbnails(
    blobs: BlobStore,
    image: Image.Image,
    sizes: Sequence[int] = THUMBNAIL_SIZES,
    executor: Executor | None = None,
) -> list[NewThumbnail]:
    """Encode and store an image's thumbnails; returns what to record for it."""
    loop = asyncio.get_running_loop()
    encoded = await loop.run_in_executor(executor, encode_thumbnails, image, sizes)
    return stored_thumbnails(encoded, await blobs.put_many([data for *_, data in encoded]))


def stored_thumbnails(
    encoded: Sequence[tuple[int, int, int, bytes]], keys: Sequence[str]
) -> list[NewThumbnail]:
    """What to record of :func:`encode_thumbnails`' output, stored under ``keys``."""
    return [
        NewThumbnail(size=size, blob_key=key, width=width, height=height)
        for (size, width, height, _), key in zip(encoded, keys, strict=True)
    ]


async def backfill_thumbnails(
    database: Database, blobs: BlobStore, sizes: Sequence[int] = THUMBNAIL_SIZES
) -> tuple[int, int]:
    """Make the missing thumbnails of every finished image: (images done, images skipped
    because their PNG is gone or unreadable)."""
    done = skipped = 0
    last_id = 0
    while True:
        async with database.session() as session:
            batch = await images_missing_thumbnails(session, sizes, after_id=last_id, limit=50)
        if not batch:
            return done, skipped
        for row in batch:
            last_id = row.id
            try:
                data = await blobs.get(row.blob_key)
                picture = Image.open(io.BytesIO(data))
                picture.load()
            except (BlobNotFound, OSError) as exc:
                log.warning("image %s has no readable PNG (%s); no thumbnails", row.id, exc)
                skipped += 1
                continue
            made = await store_thumbnails(blobs, picture, sizes)
            async with database.session() as session:
                await record_thumbnails(session, row.id, made)
            done += 1
