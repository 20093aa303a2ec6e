"""Likes and the community gallery queries.

Liking is idempotent: a user's like counts once however often it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Select, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.database import insert_or_ignore
from storage.generations import ensure_user, get_image
from storage.models import Generation, GenerationStatus, GenerationStyle, Image, Like, utcnow
from storage.recipe import Recipe

MAX_PAGE_SIZE = 25


class GallerySort(StrEnum):
    TOP = "top"
    NEW = "new"


@dataclass(frozen=True)
class GalleryEntry:
    image: Image
    generation_id: int
    prompt: str
    requester_id: int
    like_count: int


@dataclass(frozen=True)
class GalleryPage:
    entries: list[GalleryEntry]
    page: int
    page_size: int
    has_next: bool


async def like_count(session: AsyncSession, image_id: int) -> int:
    count = await session.scalar(select(Image.like_count).where(Image.id == image_id))
    return int(count or 0)


async def _add_to_count(session: AsyncSession, image_id: int, change: int) -> int:
    # One atomic UPDATE: concurrent likers of an image queue on its row, each adding to the
    # count the one before it committed.
    count = await session.scalar(
        update(Image)
        .where(Image.id == image_id)
        .values(like_count=Image.like_count + change)
        .returning(Image.like_count)
    )
    return int(count or 0)


async def like(session: AsyncSession, user_id: int, image_id: int) -> int:
    """Record that ``user_id`` likes the image (once); returns the image's like count."""
    await get_image(session, image_id)
    await ensure_user(session, user_id)
    added = await session.scalar(
        insert_or_ignore(
            session.get_bind().dialect.name,
            Like,
            {"user_id": user_id, "image_id": image_id, "created_at": utcnow()},
            ["user_id", "image_id"],
        ).returning(Like.image_id)
    )
    if added is None:  # liked already, perhaps a moment ago by a second click
        return await like_count(session, image_id)
    return await _add_to_count(session, image_id, 1)


async def unlike(session: AsyncSession, user_id: int, image_id: int) -> int:
    """Remove the user's like if there is one; returns the image's like count."""
    await get_image(session, image_id)
    removed = await session.scalar(
        delete(Like)
        .where(Like.user_id == user_id, Like.image_id == image_id)
        .returning(Like.image_id)
    )
    if removed is None:
        return await like_count(session, image_id)
    return await _add_to_count(session, image_id, -1)


async def has_liked(session: AsyncSession, user_id: int, image_id: int) -> bool:
    return await session.get(Like, (user_id, image_id)) is not None


async def toggle_like(session: AsyncSession, user_id: int, image_id: int) -> tuple[bool, int]:
    """Like if not yet liked, else unlike; returns (liked now, like count)."""
    if await has_liked(session, user_id, image_id):
        return False, await unlike(session, user_id, image_id)
    return True, await like(session, user_id, image_id)


async def remove_from_gallery(session: AsyncSession, image_id: int, by: int) -> Image:
    """The image was deleted from Discord: the gallery no longer shows it. The row, its
    recipe and its likes stay, so nothing is lost and ``/show`` still finds it."""
    image = await get_image(session, image_id)
    if image.removed_at is None:
        image.removed_at = utcnow()
        image.removed_by = by
    return image


def _gallery_query(
    style: str | None,
    sort: GallerySort,
    since: datetime | None,
    guild_id: int | None = None,
    nsfw: bool = True,
) -> Select[Image, Any, Recipe, int]:
    query = (
        select(Image, Image.like_count, Generation.recipe, Generation.requester_id)
        .join(Generation, Image.generation_id == Generation.id)
        .where(
            Generation.status == GenerationStatus.SUCCEEDED,
            Image.removed_at.is_(None),
            # A private result was answered to its author alone: not the server's to browse.
            Generation.private.is_(False),
        )
    )
    if style is not None:
        query = query.where(
            select(GenerationStyle.generation_id)
            .where(
                GenerationStyle.generation_id == Generation.id,
                GenerationStyle.style_name == style,
            )
            .exists()
        )
    if since is not None:
        query = query.where(Image.created_at >= since)
    if guild_id is not None:
        query = query.where(Generation.guild_id == guild_id)
    if not nsfw:
        query = query.where(Generation.nsfw.is_(False))
    if sort is GallerySort.TOP:
        query = query.order_by(Image.like_count.desc(), Image.created_at.desc(), Image.id.desc())
    else:
        query = query.order_by(Image.created_at.desc(), Image.id.desc())
    return query


async def gallery_page(
    session: AsyncSession,
    *,
    style: str | None = None,
    sort: GallerySort = GallerySort.TOP,
    since: datetime | None = None,
    page: int = 0,
    page_size: int = 10,
    guild_id: int | None = None,
    nsfw: bool = True,
) -> GalleryPage:
    """One page of images, most liked (``top``) or newest (``new``) first; without the
    images of NSFW prompts unless ``nsfw``."""
    if page < 0:
        raise ValueError("page must be 0 or more")
    page_size = max(1, min(page_size, MAX_PAGE_SIZE))
    rows = await session.execute(
        _gallery_query(style, sort, since, guild_id, nsfw)
        .offset(page * page_size)
        .limit(page_size + 1)
    )
    entries = [
        GalleryEntry(
            image=image,
            generation_id=image.generation_id,
            prompt=recipe.prompt,
            requester_id=requester_id,
            like_count=int(count),
        )
        for image, count, recipe, requester_id in rows.all()
    ]
    return GalleryPage(
        entries=entries[:page_size],
        page=page,
        page_size=page_size,
        has_next=len(entries) > page_size,
    )
