"""Likes and the community gallery queries.

Liking is idempotent: a user's like counts once however often it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

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
    count = await session.scalar(
        select(func.count()).select_from(Like).where(Like.image_id == image_id)
    )
    return int(count or 0)


async def like(session: AsyncSession, user_id: int, image_id: int) -> int:
    """Record that ``user_id`` likes the image (once); returns the image's like count."""
    await get_image(session, image_id)
    await ensure_user(session, user_id)
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    await session.execute(
        insert(Like)
        .values(user_id=user_id, image_id=image_id, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["user_id", "image_id"])
    )
    return await like_count(session, image_id)


async def unlike(session: AsyncSession, user_id: int, image_id: int) -> int:
    """Remove the user's like if there is one; returns the image's like count."""
    await get_image(session, image_id)
    await session.execute(delete(Like).where(Like.user_id == user_id, Like.image_id == image_id))
    return await like_count(session, image_id)


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
    style: str | None, sort: GallerySort, since: datetime | None, guild_id: int | None = None
) -> Select[Image, Any, Recipe, int]:
    likes = (
        select(Like.image_id, func.count().label("likes"))
        .group_by(Like.image_id)
        .subquery("like_counts")
    )
    like_total = func.coalesce(likes.c.likes, 0)
    query = (
        select(Image, like_total, Generation.recipe, Generation.requester_id)
        .join(Generation, Image.generation_id == Generation.id)
        .outerjoin(likes, likes.c.image_id == Image.id)
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
    if sort is GallerySort.TOP:
        query = query.order_by(like_total.desc(), Image.created_at.desc(), Image.id.desc())
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
) -> GalleryPage:
    """One page of images, most liked (``top``) or newest (``new``) first."""
    if page < 0:
        raise ValueError("page must be 0 or more")
    page_size = max(1, min(page_size, MAX_PAGE_SIZE))
    rows = await session.execute(
        _gallery_query(style, sort, since, guild_id).offset(page * page_size).limit(page_size + 1)
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
