"""The web gallery: a Starlette app over the database and the blob store, read-only.

Routes (the pages' markup is part of the contract the browser test relies on):

    /g/{guild}                  the server's gallery (sort, period, style, after)
    /g/{guild}/styles           every style with its preview and best images
    /g/{guild}/u/{user}         one member's images
    /i/{image}                  one image: recipe, "copy as /imagine", likes, lineage
    /media/{key}.png            an image's PNG (its recipe inside)
    /media/{key}-{size}.webp    its thumbnail
    /static/...                 CSS and JS;  /healthz

What is not visible (see :mod:`storage.web_gallery`) answers the same 404 as what does not
exist, so ids say nothing about servers that keep their gallery off.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.convertors import IntegerConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bot.prompt import format_recipe
from bot.web.guard import RateLimit, RateLimiter, SecurityHeaders
from storage.blobs import BlobStore
from storage.database import Database
from storage.errors import BlobNotFound
from storage.models import MAX_ID
from storage.style_store import STYLE_NAME
from storage.web_gallery import (
    BadCursor,
    Period,
    WebImage,
    WebSort,
    gallery_page,
    image_detail,
    styles_page,
    used_styles,
    visible_blob,
    visible_thumbnail,
    web_enabled,
)

HERE = Path(__file__).parent
CARD_SIZE = 256
PAGE_SIZE = 768
# Media URLs are content-addressed, but an image can be hidden (deleted from Discord, made
# private, the server's gallery turned off): caches keep a copy five minutes, then ask
# again with its ETag, which costs a 304 while it is visible and ends in a 404 after.
MEDIA_CACHE = "public, max-age=300"
_MEDIA = re.compile(r"^(?P<key>[0-9a-f]{64})(?:\.png|-(?P<size>[0-9]{1,4})\.webp)$")
FolderStyle = tuple[str, str, Sequence[str]]


class IdConvertor(IntegerConvertor):
    """A path's id: at most 20 digits (a 64-bit key has 19), so that a path of thousands
    of digits misses the route (404) instead of failing Python's int() (500). Ids past
    ``MAX_ID`` are the handlers' to answer with the same 404."""

    regex = "[0-9]{1,20}"


register_url_convertor("id", IdConvertor())


@dataclass
class Gallery:
    database: Database
    blobs: BlobStore
    public_url: str | None
    folder_styles: Callable[[], Sequence[FolderStyle]]
    templates: Environment

    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.templates.get_template(name).render(**context), status)

    def absolute(self, request: Request, path: str) -> str:
        """``path`` on the site's public address (IMAGINE_PUBLIC_URL), else the request's."""
        base = self.public_url or str(request.base_url).rstrip("/")
        return base + path


def media_path(image: WebImage, size: int | None = None) -> str:
    if size is None:
        return f"/media/{image.blob_key}.png"
    return f"/media/{image.blob_key}-{size}.webp"


def picture(image: WebImage, size: int) -> dict[str, Any]:
    """Where an <img> of about ``size`` pixels comes from, and its box. Without a thumbnail
    (an image older than them, before ``imagine thumbnails`` ran) the browser scales the PNG."""
    thumb = image.thumbnails.get(size)
    if thumb is not None:
        return {"src": media_path(image, size), "width": thumb.width, "height": thumb.height}
    scale = min(1.0, size / max(image.width, image.height))
    return {
        "src": media_path(image),
        "width": round(image.width * scale),
        "height": round(image.height * scale),
    }


def _not_found() -> HTTPException:
    return HTTPException(404)


def _gallery(request: Request) -> Gallery:
    gallery: Gallery = request.app.state.gallery
    return gallery


def _choice(request: Request, name: str, kind: type[WebSort] | type[Period], default: str) -> Any:
    value = request.query_params.get(name) or default  # ?sort= left empty: the default
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise HTTPException(400, f"{name} must be one of {allowed}.") from None


def _page_link(request: Request, path: str, **params: str | None) -> str:
    query = {key: value for key, value in params.items() if value}
    return path + ("?" + urlencode(query) if query else "")


async def _images_page(request: Request, guild_id: int, user_id: int | None) -> HTMLResponse:
    gallery = _gallery(request)
    if user_id is not None and user_id > MAX_ID:
        raise _not_found()
    async with gallery.database.session() as session:
        # First: a server whose gallery is off answers 404 whatever the query says.
        if not await web_enabled(session, guild_id):
            raise _not_found()
        sort = _choice(request, "sort", WebSort, "new")
        period = _choice(request, "period", Period, "all")
        style = request.query_params.get("style") or None
        if style is not None and not STYLE_NAME.fullmatch(style):
            raise HTTPException(400, "style must be a style's name: letters, digits, - and _.")
        after = request.query_params.get("after") or None
        try:
            page = await gallery_page(
                session,
                guild_id,
                sort=sort,
                period=period,
                style=style,
                user_id=user_id,
                after=after,
            )
        except BadCursor:
            raise HTTPException(
                400, "This page link is broken; start again from the gallery's first page."
            ) from None
        styles = await used_styles(session, guild_id) if user_id is None else []
    path = request.url.path
    next_link = None
    if page.next_cursor is not None:
        next_link = _page_link(
            request,
            path,
            sort=sort.value if sort is not WebSort.NEW else None,
            period=period.value if period is not Period.ALL else None,
            style=style,
            after=page.next_cursor,
        )
    return gallery.render(
        "gallery.html",
        guild_id=guild_id,
        user_id=user_id,
        cards=[(image, picture(image, CARD_SIZE)) for image in page.images],
        next_link=next_link,
        sort=sort.value,
        period=period.value,
        style=style,
        styles=styles,
        link=lambda **params: _page_link(request, path, **params),
    )


async def guild_gallery(request: Request) -> Response:
    return await _images_page(request, request.path_params["guild_id"], None)


async def user_gallery(request: Request) -> Response:
    return await _images_page(
        request, request.path_params["guild_id"], request.path_params["user_id"]
    )


async def guild_styles(request: Request) -> Response:
    gallery = _gallery(request)
    guild_id = request.path_params["guild_id"]
    async with gallery.database.session() as session:
        if not await web_enabled(session, guild_id):
            raise _not_found()
        cards = await styles_page(session, guild_id, gallery.folder_styles())
    return gallery.render(
        "styles.html",
        guild_id=guild_id,
        styles=[
            (
                card,
                picture(card.preview, PAGE_SIZE) if card.preview else None,
                [(image, picture(image, CARD_SIZE)) for image in card.best],
            )
            for card in cards
        ],
    )


async def image_page(request: Request) -> Response:
    gallery = _gallery(request)
    async with gallery.database.session() as session:
        detail = await image_detail(session, request.path_params["image_id"])
    if detail is None:
        raise _not_found()
    image = detail.image
    return gallery.render(
        "image.html",
        image=image,
        shown=picture(image, PAGE_SIZE),
        pixels=max(image.width, image.height) * 2 <= PAGE_SIZE,
        command=format_recipe(image.recipe),
        detail=detail,
        page_url=gallery.absolute(request, f"/i/{image.id}"),
        og_image=gallery.absolute(request, media_path(image)),
        png=media_path(image),
    )


async def media(request: Request) -> Response:
    gallery = _gallery(request)
    match = _MEDIA.fullmatch(request.path_params["name"])
    if match is None:
        raise _not_found()
    key, size = match["key"], match["size"]
    async with gallery.database.session() as session:
        if size is None:
            served = key if await visible_blob(session, key) else None
            media_type = "image/png"
        else:
            thumb = await visible_thumbnail(session, key, int(size))
            served = thumb.blob_key if thumb is not None else None
            media_type = "image/webp"
    if served is None:
        raise _not_found()
    headers = {"Cache-Control": MEDIA_CACHE, "ETag": f'"{served}"'}
    if _matches(request.headers.get("if-none-match"), served):
        return Response(status_code=304, headers=headers)
    try:
        data = await gallery.blobs.get(served)
    except BlobNotFound:
        raise _not_found() from None
    return Response(data, media_type=media_type, headers=headers)


def _matches(if_none_match: str | None, key: str) -> bool:
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or f'"{key}"' in tags


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    gallery = _gallery(request)
    if exc.status_code == 404:
        # One page for every miss: an id of a server whose gallery is off reads like no id.
        return gallery.render("not_found.html", 404)
    return gallery.render("error.html", exc.status_code, message=exc.detail)


def make_templates() -> Environment:
    return Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def create_app(
    database: Database,
    blobs: BlobStore,
    *,
    public_url: str | None = None,
    requests_per_minute: int = 600,
    folder_styles: Callable[[], Sequence[FolderStyle]] = tuple,
    clock: Callable[[], float] | None = None,
) -> Starlette:
    """The gallery app. ``folder_styles`` lists the styles folder's (name, description,
    trigger words); ``clock`` drives the rate limiter (tests)."""
    templates = make_templates()
    limiter = RateLimiter(requests_per_minute, clock) if clock else RateLimiter(requests_per_minute)
    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/g/{guild_id:id}", guild_gallery),
            Route("/g/{guild_id:id}/styles", guild_styles),
            Route("/g/{guild_id:id}/u/{user_id:id}", user_gallery),
            Route("/i/{image_id:id}", image_page),
            Route("/media/{name:str}", media),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(SecurityHeaders), Middleware(RateLimit, limiter=limiter)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.gallery = Gallery(database, blobs, public_url, folder_styles, templates)
    return app
