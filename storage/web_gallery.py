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
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    MAX_ID,
    Generation,
    GenerationKind,
    GenerationStatus,
    GenerationStyle,
    Guild,
    Image,
    Style,
    Thumbnail,
    utcnow,
)
from storage.recipe import Recipe

PAGE_SIZE = 24


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


MAX_LIKES = 2**31 - 1  # images.like_count is a 32-bit integer on PostgreSQL


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


# An image (its like count included) with its generation's guild, requester, recipe and kind.
VisibleRows = Select[Image, int | None, int, Recipe, GenerationKind]


def _card_query() -> VisibleRows:
    """What a card needs of an image, whether the web may show it or not."""
    return select(
        Image,
        Generation.guild_id,
        Generation.requester_id,
        Generation.recipe,
        Generation.kind,
    ).join(Generation, Image.generation_id == Generation.id)


def _visible_query() -> VisibleRows:
    """Every image the web may show, with what a card needs."""
    return (
        _card_query()
        .join(Guild, Guild.id == Generation.guild_id)
        .where(
            Guild.web_enabled.is_(True),
            Generation.status == GenerationStatus.SUCCEEDED,
            Generation.private.is_(False),
            or_(Generation.nsfw.is_(False), Guild.web_nsfw.is_(True)),
            Image.removed_at.is_(None),
        )
    )


def _web_image(row: Any, thumbnails: dict[int, dict[int, Thumb]]) -> WebImage:
    image, guild_id, requester_id, recipe, kind = row
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
        likes=image.like_count,
        thumbnails=thumbnails.get(image.id, {}),
    )


async def _rows(session: AsyncSession, query: VisibleRows) -> list[WebImage]:
    rows = (await session.execute(query)).all()
    ids = [row[0].id for row in rows]
    thumbnails: dict[int, dict[int, Thumb]] = {}
    if ids:
        for thumb in await session.scalars(select(Thumbnail).where(Thumbnail.image_id.in_(ids))):
            thumbnails.setdefault(thumb.image_id, {})[thumb.size] = Thumb(
                thumb.blob_key, thumb.width, thumb.height
            )
    return [_web_image(row, thumbnails) for row in rows]


async def _in_order(session: AsyncSession, ids: Sequence[int]) -> list[WebImage]:
    """The images of ``ids`` (just found visible), in that order. Fetched by key alone: with
    the visibility conditions too, SQLite walks every succeeded generation to find 24 ids."""
    rows = await _rows(session, _card_query().where(Image.id.in_(ids)))
    found = {image.id: image for image in rows}
    return [found[image_id] for image_id in ids if image_id in found]


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
        likes = values[1] if sort is WebSort.TOP else None
        if likes is not None and not (_an_int(likes) and 0 <= likes <= MAX_LIKES):
            raise BadCursor(cursor)
        created_text, image_id = values[-2], values[-1]
        created = datetime.fromisoformat(created_text)
        if created.tzinfo is None or not _an_int(image_id) or not 0 < image_id <= MAX_ID:
            raise BadCursor(cursor)
        return likes, created.astimezone(UTC), image_id  # a time past year 9999 in UTC fails
    except (binascii.Error, ValueError, TypeError, IndexError, UnicodeDecodeError, OverflowError):
        raise BadCursor(cursor) from None


def _an_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _after(sort: WebSort, cursor: tuple[int | None, datetime, int]) -> ColumnElement[bool]:
    likes, created, image_id = cursor
    older = or_(Image.created_at < created, and_(Image.created_at == created, Image.id < image_id))
    if sort is WebSort.TOP:
        assert likes is not None
        return or_(Image.like_count < likes, and_(Image.like_count == likes, older))
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
    query = _visible_query().where(Generation.guild_id == guild_id)
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
        query = query.where(_after(sort, cursor))
    if sort is WebSort.TOP:
        query = query.order_by(Image.like_count.desc(), Image.created_at.desc(), Image.id.desc())
    else:
        query = query.order_by(Image.created_at.desc(), Image.id.desc())
    # The page's ids first, then their rows: sorting ids only keeps the recipes (large JSON)
    # out of the sort, which SQLite otherwise does over every visible image.
    ids = list(await session.scalars(query.with_only_columns(Image.id).limit(page_size + 1)))
    images = await _in_order(session, ids[:page_size])
    more = len(ids) > page_size and bool(images)
    return WebPage(images, encode_cursor(sort, images[-1]) if more else None)


async def used_styles(session: AsyncSession, guild_id: int) -> list[str]:
    """The styles the server's visible images were made with, for the gallery's filter."""
    # Each styled generation asked whether it has a visible image: on SQLite, listing every
    # visible image's generation first walked the whole gallery on each page.
    visible = (
        _visible_query()
        .with_only_columns(Image.id)
        .where(
            Generation.guild_id == guild_id,
            Image.generation_id == GenerationStyle.generation_id,
        )
    )
    names = await session.scalars(
        select(GenerationStyle.style_name)
        .where(visible.exists())
        .distinct()
        .order_by(GenerationStyle.style_name)
    )
    return list(names)


async def visible_image(session: AsyncSession, image_id: int) -> WebImage | None:
    if not 0 < image_id <= MAX_ID:
        return None
    found = await _rows(session, _visible_query().where(Image.id == image_id))
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
    children = await _rows(
        session,
        _visible_query().where(Generation.parent_image_id == image_id).order_by(Image.id).limit(48),
    )
    siblings = await _rows(
        session,
        _visible_query()
        .where(Image.generation_id == image.generation_id, Image.id != image_id)
        .order_by(Image.index),
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
    ranked = await _most_liked_by_style(session, guild_id, list(described), best)
    preview_ids = [preview for _, _, preview in described.values() if preview is not None]
    shown = await _in_order(session, sorted({i for ids in ranked.values() for i in ids}))
    previews = (
        await _rows(session, _visible_query().where(Image.id.in_(preview_ids)))
        if preview_ids
        else []
    )
    by_id = {image.id: image for image in shown}
    cards = []
    for name in sorted(described):
        description, words, preview_id = described[name]
        images = [by_id[image_id] for image_id in ranked.get(name, []) if image_id in by_id]
        preview = next(
            (p for p in previews if p.id == preview_id and p.guild_id == guild_id),
            images[0] if images else None,
        )
        cards.append(StyleCard(name, description, words, preview, images))
    return cards


async def _most_liked_by_style(
    session: AsyncSession, guild_id: int, names: Sequence[str], best: int
) -> dict[str, list[int]]:
    """The ids of each style's ``best`` most liked visible images, in one query for every
    style (a query per style made the styles page slow)."""
    if not names:
        return {}
    ranked = (
        _visible_query()
        .join(GenerationStyle, GenerationStyle.generation_id == Generation.id)
        .where(Generation.guild_id == guild_id, GenerationStyle.style_name.in_(names))
        .with_only_columns(
            GenerationStyle.style_name.label("style"),
            Image.id.label("image_id"),
            func.row_number()
            .over(
                partition_by=GenerationStyle.style_name,
                order_by=(Image.like_count.desc(), Image.created_at.desc(), Image.id.desc()),
            )
            .label("rank"),
        )
        .subquery()
    )
    rows = await session.execute(
        select(ranked.c.style, ranked.c.image_id)
        .where(ranked.c.rank <= best)
        .order_by(ranked.c.style, ranked.c.rank)
    )
    found: dict[str, list[int]] = {}
    for style, image_id in rows:
        found.setdefault(style, []).append(image_id)
    return found


async def visible_blob(session: AsyncSession, blob_key: str) -> bool:
    """Whether a full PNG may be served: some visible image is stored under ``blob_key``."""
    found = await session.execute(_visible_query().where(Image.blob_key == blob_key).limit(1))
    return found.first() is not None


async def visible_thumbnail(session: AsyncSession, image_blob_key: str, size: int) -> Thumb | None:
    """The thumbnail of ``size`` of a visible image stored under ``image_blob_key``."""
    visible_ids = (
        _visible_query().where(Image.blob_key == image_blob_key).with_only_columns(Image.id)
    )
    thumb = await session.scalar(
        select(Thumbnail)
        .where(Thumbnail.image_id.in_(visible_ids), Thumbnail.size == size)
        .limit(1)
    )
    return None if thumb is None else Thumb(thumb.blob_key, thumb.width, thumb.height)
