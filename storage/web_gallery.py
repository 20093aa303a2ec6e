"""What the web gallery may show, read-only: pages of a server's images, one image with its
lineage, the styles, and which blob a /media/ URL may serve.

An image is on the web only when all of these hold: its server turned the web gallery on
(``/policy web on``), its generation succeeded, it was not removed, its generation was not
private (an ephemeral reply), and its prompt was not NSFW unless the server also turned on
``/policy web-nsfw``. Everything else reads as absent, the same as an id that never existed.

Pages are keyset-paginated: ``new`` on (created_at, id), ``top`` on (likes, created_at, id),
both descending, with an opaque cursor naming the last image shown.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    Generation,
    GenerationKind,
    GenerationStatus,
    GenerationStyle,
    Guild,
    Image,
    Like,
    Style,
    Thumbnail,
    utcnow,
)
from storage.recipe import Recipe

PAGE_SIZE = 24
MAX_ID = 2**63 - 1


class WebSort(StrEnum):
    NEW = "new"
    TOP = "top"


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    ALL = "all"

    def since(self, now: datetime) -> datetime | None:
        if self is Period.DAY:
            return now - timedelta(days=1)
        if self is Period.WEEK:
            return now - timedelta(days=7)
        return None


class BadCursor(ValueError):
    """A page cursor that this gallery did not write."""


@dataclass(frozen=True)
class Thumb:
    blob_key: str
    width: int
    height: int


@dataclass(frozen=True)
class WebImage:
    id: int
    generation_id: int
    index: int
    guild_id: int
    requester_id: int
    recipe: Recipe
    kind: GenerationKind
    blob_key: str
    width: int
    height: int
    created_at: datetime
    likes: int
    thumbnails: dict[int, Thumb] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.recipe.prompt


@dataclass(frozen=True)
class WebPage:
    images: list[WebImage]
    next_cursor: str | None


@dataclass(frozen=True)
class ImageDetail:
    image: WebImage
    parent: WebImage | None
    children: list[WebImage]
    siblings: list[WebImage]


@dataclass(frozen=True)
class StyleCard:
    name: str
    description: str
    trigger_words: list[str]
    preview: WebImage | None
    best: list[WebImage]


# -- the rule --------------------------------------------------------------------------------


def _visible_query() -> tuple[Select[Any], ColumnElement[int]]:
    """Every image the web may show, with what a card needs, and its like count."""
    # Counted per image (by the likes index), so a page of newest images counts only its own.
    like_total = (
        select(func.count())
        .select_from(Like)
        .where(Like.image_id == Image.id)
        .correlate(Image)
        .scalar_subquery()
    )
    query = (
        select(
            Image,
            Generation.guild_id,
            Generation.requester_id,
            Generation.recipe,
            Generation.kind,
            like_total.label("likes"),
        )
        .join(Generation, Image.generation_id == Generation.id)
        .join(Guild, Guild.id == Generation.guild_id)
        .where(
            Guild.web_enabled.is_(True),
            Generation.status == GenerationStatus.SUCCEEDED,
            Generation.private.is_(False),
            or_(Generation.nsfw.is_(False), Guild.web_nsfw.is_(True)),
            Image.removed_at.is_(None),
        )
    )
    return query, like_total


def _web_image(row: Any, thumbnails: dict[int, dict[int, Thumb]]) -> WebImage:
    image, guild_id, requester_id, recipe, kind, likes = row
    return WebImage(
        id=image.id,
        generation_id=image.generation_id,
        index=image.index,
        guild_id=guild_id,
        requester_id=requester_id,
        recipe=recipe,
        kind=kind,
        blob_key=image.blob_key,
        width=image.width,
        height=image.height,
        created_at=image.created_at,
        likes=int(likes),
        thumbnails=thumbnails.get(image.id, {}),
    )


async def _rows(session: AsyncSession, query: Select[Any]) -> list[WebImage]:
    rows = (await session.execute(query)).all()
    ids = [row[0].id for row in rows]
    thumbnails: dict[int, dict[int, Thumb]] = {}
    if ids:
        for thumb in await session.scalars(select(Thumbnail).where(Thumbnail.image_id.in_(ids))):
            thumbnails.setdefault(thumb.image_id, {})[thumb.size] = Thumb(
                thumb.blob_key, thumb.width, thumb.height
            )
    return [_web_image(row, thumbnails) for row in rows]


async def web_enabled(session: AsyncSession, guild_id: int) -> bool:
    """Whether the server put its gallery on the web."""
    if not 0 < guild_id <= MAX_ID:
        return False
    enabled = await session.scalar(select(Guild.web_enabled).where(Guild.id == guild_id))
    return bool(enabled)


# -- cursors ---------------------------------------------------------------------------------


def encode_cursor(sort: WebSort, image: WebImage) -> str:
    values: list[Any] = [image.created_at.isoformat(), image.id]
    if sort is WebSort.TOP:
        values.insert(0, image.likes)
    raw = json.dumps([sort.value, *values], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(sort: WebSort, cursor: str) -> tuple[int | None, datetime, int]:
    """(likes or None, created_at, id) of the last image of the page before."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
        if not isinstance(values, list) or values[0] != sort.value:
            raise BadCursor(cursor)
        likes = int(values[1]) if sort is WebSort.TOP else None
        created_text, image_id = values[-2], values[-1]
        created = datetime.fromisoformat(created_text)
        if created.tzinfo is None or not isinstance(image_id, int) or not 0 < image_id <= MAX_ID:
            raise BadCursor(cursor)
        return likes, created, image_id
    except (binascii.Error, ValueError, TypeError, IndexError, UnicodeDecodeError):
        raise BadCursor(cursor) from None


def _after(
    sort: WebSort, like_total: ColumnElement[int], cursor: tuple[int | None, datetime, int]
) -> ColumnElement[bool]:
    likes, created, image_id = cursor
    older = or_(Image.created_at < created, and_(Image.created_at == created, Image.id < image_id))
    if sort is WebSort.TOP:
        assert likes is not None
        return or_(like_total < likes, and_(like_total == likes, older))
    return older


# -- pages -----------------------------------------------------------------------------------


async def gallery_page(
    session: AsyncSession,
    guild_id: int,
    *,
    sort: WebSort = WebSort.NEW,
    period: Period = Period.ALL,
    style: str | None = None,
    user_id: int | None = None,
    after: str | None = None,
    page_size: int = PAGE_SIZE,
    now: datetime | None = None,
) -> WebPage:
    """One page of the server's visible images; :class:`BadCursor` for a forged ``after``."""
    cursor = decode_cursor(sort, after) if after else None
    query, like_total = _visible_query()
    query = query.where(Generation.guild_id == guild_id)
    if user_id is not None:
        query = query.where(Generation.requester_id == user_id)
    if style is not None:
        query = query.where(
            select(GenerationStyle.generation_id)
            .where(
                GenerationStyle.generation_id == Generation.id,
                GenerationStyle.style_name == style,
            )
            .exists()
        )
    since = period.since(now or utcnow())
    if since is not None:
        query = query.where(Image.created_at >= since)
    if cursor is not None:
        query = query.where(_after(sort, like_total, cursor))
    if sort is WebSort.TOP:
        query = query.order_by(like_total.desc(), Image.created_at.desc(), Image.id.desc())
    else:
        query = query.order_by(Image.created_at.desc(), Image.id.desc())
    images = await _rows(session, query.limit(page_size + 1))
    more = len(images) > page_size
    images = images[:page_size]
    return WebPage(images, encode_cursor(sort, images[-1]) if more else None)


async def used_styles(session: AsyncSession, guild_id: int) -> list[str]:
    """The styles the server's visible images were made with, for the gallery's filter."""
    query, _ = _visible_query()
    used = query.where(Generation.guild_id == guild_id).with_only_columns(Generation.id)
    names = await session.scalars(
        select(GenerationStyle.style_name)
        .where(GenerationStyle.generation_id.in_(used))
        .distinct()
        .order_by(GenerationStyle.style_name)
    )
    return list(names)


async def visible_image(session: AsyncSession, image_id: int) -> WebImage | None:
    if not 0 < image_id <= MAX_ID:
        return None
    query, _ = _visible_query()
    found = await _rows(session, query.where(Image.id == image_id))
    return found[0] if found else None


async def image_detail(session: AsyncSession, image_id: int) -> ImageDetail | None:
    """The image with what it came from and what was made from it, all visible ones only."""
    image = await visible_image(session, image_id)
    if image is None:
        return None
    generation = await session.get(Generation, image.generation_id)
    assert generation is not None
    parent = None
    if generation.parent_image_id is not None:
        parent = await visible_image(session, generation.parent_image_id)
    query, _ = _visible_query()
    children = await _rows(
        session,
        query.where(Generation.parent_image_id == image_id).order_by(Image.id).limit(48),
    )
    query, _ = _visible_query()
    siblings = await _rows(
        session,
        query.where(Image.generation_id == image.generation_id, Image.id != image_id).order_by(
            Image.index
        ),
    )
    return ImageDetail(image, parent, children, siblings)


async def styles_page(
    session: AsyncSession,
    guild_id: int,
    folder_styles: Sequence[tuple[str, str, Sequence[str]]] = (),
    best: int = 4,
) -> list[StyleCard]:
    """Every style the server can use (the folder's, given as (name, description, trigger
    words), and those added from Discord), each with its preview and most liked images."""
    described: dict[str, tuple[str, list[str], int | None]] = {
        name: (description, list(words), None) for name, description, words in folder_styles
    }
    rows = await session.scalars(
        select(Style)
        .where(Style.guild_id.in_([0, guild_id]), Style.enabled.is_(True))
        .order_by(Style.guild_id, Style.name)
    )
    for style in rows:
        described[style.name] = (
            style.description,
            list(style.trigger_words or []),
            style.preview_image_id,
        )
    cards = []
    for name in sorted(described):
        description, words, preview_id = described[name]
        page = await gallery_page(session, guild_id, sort=WebSort.TOP, style=name, page_size=best)
        preview = await visible_image(session, preview_id) if preview_id is not None else None
        if preview is not None and preview.guild_id != guild_id:
            preview = None
        if preview is None and page.images:
            preview = page.images[0]
        cards.append(StyleCard(name, description, words, preview, page.images))
    return cards


async def visible_blob(session: AsyncSession, blob_key: str) -> bool:
    """Whether a full PNG may be served: some visible image is stored under ``blob_key``."""
    query, _ = _visible_query()
    found = await session.execute(query.where(Image.blob_key == blob_key).limit(1))
    return found.first() is not None


async def visible_thumbnail(session: AsyncSession, image_blob_key: str, size: int) -> Thumb | None:
    """The thumbnail of ``size`` of a visible image stored under ``image_blob_key``."""
    query, _ = _visible_query()
    visible_ids = query.where(Image.blob_key == image_blob_key).with_only_columns(Image.id)
    thumb = await session.scalar(
        select(Thumbnail)
        .where(Thumbnail.image_id.in_(visible_ids), Thumbnail.size == size)
        .limit(1)
    )
    return None if thumb is None else Thumb(thumb.blob_key, thumb.width, thumb.height)
