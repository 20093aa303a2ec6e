"""WebP thumbnails of images: made once (by the worker, or ``imagine thumbnails`` for older
images), kept in the blob store and recorded here; the web gallery only reads them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.database import insert_or_ignore
from storage.models import Generation, GenerationStatus, Image, Thumbnail, utcnow

# Longest side in pixels: cards in the gallery grid, and the image page's picture.
THUMBNAIL_SIZES = (256, 768)


@dataclass(frozen=True)
class NewThumbnail:
    size: int
    blob_key: str
    width: int
    height: int


def thumbnail_dimensions(width: int, height: int, size: int) -> tuple[int, int]:
    """The size of a thumbnail whose longest side is ``size`` (never larger than the image)."""
    scale = min(1.0, size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


async def record_thumbnails(
    session: AsyncSession, image_id: int, thumbnails: Iterable[NewThumbnail]
) -> None:
    """Record an image's thumbnails; one recorded already (a backfill racing the worker) stays."""
    await record_images_thumbnails(session, {image_id: thumbnails})


async def record_images_thumbnails(
    session: AsyncSession, thumbnails: Mapping[int, Iterable[NewThumbnail]]
) -> None:
    """:func:`record_thumbnails` for several images (by image id), in one statement."""
    now = utcnow()
    rows = [
        {
            "image_id": image_id,
            "size": thumbnail.size,
            "blob_key": thumbnail.blob_key,
            "width": thumbnail.width,
            "height": thumbnail.height,
            "created_at": now,
        }
        for image_id, made in thumbnails.items()
        for thumbnail in made
    ]
    if not rows:
        return
    await session.execute(
        insert_or_ignore(session.get_bind().dialect.name, Thumbnail, rows, ["image_id", "size"])
    )


async def images_missing_thumbnails(
    session: AsyncSession,
    sizes: Iterable[int] = THUMBNAIL_SIZES,
    *,
    after_id: int = 0,
    limit: int = 100,
) -> list[Image]:
    """Images of finished generations past ``after_id`` that lack one of ``sizes``, oldest
    first."""
    wanted = list(sizes)
    have = (
        select(func.count())
        .select_from(Thumbnail)
        .where(Thumbnail.image_id == Image.id, Thumbnail.size.in_(wanted))
        .scalar_subquery()
    )
    rows = await session.scalars(
        select(Image)
        .join(Generation, Image.generation_id == Generation.id)
        .where(
            Generation.status == GenerationStatus.SUCCEEDED,
            Image.id > after_id,
            have < len(wanted),
        )
        .order_by(Image.id)
        .limit(limit)
    )
    return list(rows)
