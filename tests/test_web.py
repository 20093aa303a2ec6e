"""The web gallery over a real database and blob store: every route, what it must never show,
its headers, its rate limit, and keyset pages that neither repeat nor skip an image.

Requests go through httpx's ASGI transport in the test's own event loop (Starlette's
TestClient would run the app on a second loop, where asyncpg's connections cannot follow).
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image as PILImage
from sqlalchemy import select

from bot.cli import main
from bot.deployment import open_deployment
from bot.prompt import PromptDefaults, PromptError, format_recipe, parse_prompt
from bot.web.app import create_app, make_templates
from bot.web.guard import CONTENT_SECURITY_POLICY
from generation.thumbnails import backfill_thumbnails, store_thumbnails
from storage.blobs import BlobStore, LocalBlobStore
from storage.community import change_policy
from storage.database import Database
from storage.errors import ConfigError
from storage.families import get_family
from storage.gallery import like, remove_from_gallery
from storage.generations import NewImage, Origin, add_images, create_generation, transition
from storage.models import (
    Generation,
    GenerationKind,
    GenerationStatus,
    Guild,
    Image,
    PolicyChange,
    Style,
    Thumbnail,
)
from storage.recipe import Recipe
from storage.settings import load_settings
from storage.thumbnails import THUMBNAIL_SIZES, record_thumbnails
from storage.web_gallery import ImageDetail, WebImage
from tests.fake_discord import ALICE as DISCORD_ALICE
from tests.fake_discord import BOB as DISCORD_BOB
from tests.fake_discord import GUILD_ID, MANAGE_GUILD, MOD
from tests.test_bot import Harness, harness, running
from tests.test_bot_edges import bot_only, click
from tests.test_prompt import texts

GUILD = 900_000_000_000_000_100
QUIET = 900_000_000_000_000_200  # a server that never turned its gallery on
ALICE = 900_000_000_000_001_001
BOB = 900_000_000_000_001_002
PUBLIC = "https://imagine.example"
DEFAULTS = PromptDefaults(model="tiny", family=get_family("tiny-sd"), count=1)
S = GenerationStatus
__all__ = ["bot_only", "harness", "running"]


def recipe_of(text: str, seed: int = 5) -> Recipe:
    [recipe] = parse_prompt(text, DEFAULTS, random_seed=lambda: seed)
    return recipe


@dataclass
class Site:
    database: Database
    blobs: BlobStore
    client: httpx.AsyncClient | None = None
    colours: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**6)))

    def png(self) -> bytes:
        """A distinct small PNG each time: distinct blob keys."""
        number = next(self.colours)
        colour = (number % 256, number // 256 % 256, 90)
        buffer = io.BytesIO()
        PILImage.new("RGB", (96, 64), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    async def make(
        self,
        text: str = "a lighthouse at dusk --steps 3",
        *,
        guild_id: int | None = GUILD,
        requester: int = ALICE,
        images: int = 1,
        private: bool = False,
        nsfw: bool = False,
        parent: int | None = None,
        kind: GenerationKind = GenerationKind.IMAGINE,
        at: datetime | None = None,
        thumbnails: bool = True,
        status: GenerationStatus = S.SUCCEEDED,
    ) -> list[int]:
        """One generation with ``images`` images, as a worker leaves it; their ids."""
        recipe = recipe_of(text)
        datas = [self.png() for _ in range(images)]
        keys = [await self.blobs.put(data) for data in datas]
        async with self.database.session() as session:
            generation = await create_generation(
                session,
                kind=kind,
                recipe=recipe,
                requester_id=requester,
                origin=Origin(guild_id=guild_id),
                parent_image_id=parent,
                private=private,
                nsfw=nsfw,
            )
            await transition(session, generation.id, S.RUNNING, worker_name="w")
            rows = await add_images(
                session,
                generation.id,
                [
                    NewImage(index, recipe.seed_for(index), 96, 64, key, key)
                    for index, key in enumerate(keys)
                ],
            )
            await transition(session, generation.id, status)
            if at is not None:
                for row in rows:
                    row.created_at = at
        ids = [row.id for row in rows]
        if thumbnails:
            for image_id, data in zip(ids, datas, strict=True):
                made = await store_thumbnails(self.blobs, PILImage.open(io.BytesIO(data)))
                async with self.database.session() as session:
                    await record_thumbnails(session, image_id, made)
        return ids

    async def policy(self, guild_id: int = GUILD, **values: bool) -> None:
        def apply(guild: Guild) -> None:
            for name, value in values.items():
                setattr(guild, name, value)

        async with self.database.session() as session:
            await change_policy(session, guild_id, ALICE, f"web {values}", apply)

    async def blob_key(self, image_id: int) -> str:
        async with self.database.session() as session:
            image = await session.get(Image, image_id)
            assert image is not None
            return image.blob_key

    async def get(self, path: str, **headers: str) -> httpx.Response:
        assert self.client is not None
        return await self.client.get(path, headers=headers)


@pytest.fixture
async def site(database: Database, tmp_path: Path) -> AsyncIterator[Site]:
    blobs = LocalBlobStore(tmp_path / "blobs")
    app = create_app(
        database,
        blobs,
        public_url=PUBLIC,
        requests_per_minute=10_000,
        folder_styles=lambda: [("watercolor", "Soft washes of colour", ("watercolor",))],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield Site(database, blobs, client)


sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def card_ids(page: str) -> list[int]:
    return [int(found) for found in re.findall(r'<a class="card" href="/i/(\d+)"', page)]


def next_link(page: str) -> str | None:
    found = re.search(r'<a class="next" rel="next" href="([^"]+)"', page)
    return html.unescape(found.group(1)) if found else None


async def walk(site: Site, path: str) -> tuple[list[int], int]:
    """Every card id from ``path`` on, following the next links; and how many pages."""
    seen: list[int] = []
    pages = 0
    link: str | None = path
    while link is not None:
        response = await site.get(link)
        assert response.status_code == 200, response.text
        seen.extend(card_ids(response.text))
        pages += 1
        link = next_link(response.text)
    return seen, pages


# -- what is never shown ------------------------------------------------------------------------


async def test_a_server_with_its_gallery_off_answers_404_everywhere(site: Site) -> None:
    [image] = await site.make(guild_id=QUIET)
    key = await site.blob_key(image)
    missing = await site.get("/i/987654321")
    assert missing.status_code == 404
    for path in (
        f"/g/{QUIET}",
        f"/g/{QUIET}?sort=bogus&after=forged",
        f"/g/{QUIET}/styles",
        f"/g/{QUIET}/u/{ALICE}",
        f"/i/{image}",
        f"/media/{key}.png",
        f"/media/{key}-256.webp",
        f"/g/{GUILD}",  # never set any policy
        "/i/99999999999999999999999",
        f"/g/{GUILD}/u/99999999999999999999999",
    ):
        response = await site.get(path)
        assert (response.status_code, response.text) == (404, missing.text), path

    await site.policy(QUIET, web_enabled=True)
    assert (await site.get(f"/i/{image}")).status_code == 200
    assert (await site.get(f"/media/{key}-256.webp")).status_code == 200
    await site.policy(QUIET, web_enabled=False)  # and off again
    assert (await site.get(f"/i/{image}")).status_code == 404
    assert (await site.get(f"/media/{key}.png")).status_code == 404


async def test_private_removed_nsfw_and_unfinished_images_stay_off_the_web(site: Site) -> None:
    await site.policy(web_enabled=True)
    [shown] = await site.make("a quiet harbour")
    [private] = await site.make("a secret garden", private=True)
    [removed] = await site.make("a deleted boat")
    [nsfw] = await site.make("a nude statue", nsfw=True)
    [failed] = await site.make("a broken thing", status=S.FAILED)
    async with site.database.session() as session:
        await remove_from_gallery(session, removed, by=ALICE)
    hidden = {private, removed, nsfw, failed}

    for path in (f"/g/{GUILD}", f"/g/{GUILD}?sort=top", f"/g/{GUILD}/u/{ALICE}"):
        assert card_ids((await site.get(path)).text) == [shown], path
    for image in hidden:
        key = await site.blob_key(image)
        for path in (f"/i/{image}", f"/media/{key}.png", f"/media/{key}-256.webp"):
            assert (await site.get(path)).status_code == 404, path
    page = (await site.get(f"/i/{shown}")).text
    assert "secret garden" not in page and "deleted boat" not in page

    await site.policy(web_nsfw=True)  # the second switch shows NSFW, and nothing else
    assert sorted(card_ids((await site.get(f"/g/{GUILD}")).text)) == sorted([shown, nsfw])
    assert (await site.get(f"/i/{private}")).status_code == 404
    assert (await site.get(f"/i/{removed}")).status_code == 404


async def test_pages_go_forward_without_repeating_or_skipping_an_image(site: Site) -> None:
    await site.policy(web_enabled=True)
    now = datetime.now(UTC)
    ids: list[int] = []
    # 30 images in 10 generations; each generation's three share a created_at (ties).
    for number in range(10):
        at = now - timedelta(hours=number * 13)
        ids += await site.make(f"lighthouse number {number}", images=3, at=at, thumbnails=False)
    for liker, image in enumerate(ids[::4]):
        for user in range(liker % 3 + 1):
            async with site.database.session() as session:
                await like(session, 500 + user, image)
    async with site.database.session() as session:
        rows = {i: at for i, at in await session.execute(select(Image.id, Image.created_at))}
    likes = {image: (ids[::4].index(image) % 3 + 1 if image in ids[::4] else 0) for image in ids}

    newest = sorted(ids, key=lambda i: (rows[i], i), reverse=True)
    seen, pages = await walk(site, f"/g/{GUILD}")
    assert seen == newest and pages == 2

    top = sorted(ids, key=lambda i: (likes[i], rows[i], i), reverse=True)
    seen, pages = await walk(site, f"/g/{GUILD}?sort=top")
    assert seen == top and pages == 2

    day = [i for i in newest if rows[i] >= now - timedelta(days=1)]
    assert (await walk(site, f"/g/{GUILD}?period=day"))[0] == day
    week = [i for i in top if rows[i] >= now - timedelta(days=7)]
    assert (await walk(site, f"/g/{GUILD}?sort=top&period=week"))[0] == week

    # A cursor of one order is refused by the other, and a forged one is refused.
    first = await site.get(f"/g/{GUILD}")
    link = next_link(first.text)
    assert link is not None
    swapped = await site.get(link + "&sort=top")
    assert swapped.status_code == 400 and "first page" in swapped.text
    assert (await site.get(f"/g/{GUILD}?after=AAAA")).status_code == 400
    bad = await site.get(f"/g/{GUILD}?sort=oldest")
    assert bad.status_code == 400 and "sort must be one of new, top" in bad.text


# -- the pages ----------------------------------------------------------------------------------


async def test_crafted_links_get_400_or_404_never_a_server_error(site: Site) -> None:
    await site.policy(web_enabled=True)
    await site.make("a quiet harbour")
    digits = "9" * 5000  # past Python's 4300-digit limit on int()
    for path in (f"/g/{digits}", f"/i/{digits}", f"/g/{GUILD}/u/{digits}"):
        assert (await site.get(path)).status_code == 404, path[:40]

    def forged(*values: Any) -> str:
        raw = json.dumps(list(values), separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    now = "2026-01-01T00:00:00+00:00"
    cursors = [
        ("top", forged("top", 10**30, now, 5)),  # past SQLite's and PostgreSQL's integers
        ("top", forged("top", 2**31, now, 5)),  # past PostgreSQL's 32-bit like count
        ("top", forged("top", -1, now, 5)),
        ("top", forged("top", True, now, 5)),
        ("top", base64.urlsafe_b64encode(b'["top",1e999,"%b",5]' % now.encode()).decode()),
        ("new", forged("new", "0001-01-01T00:00:00+01:00", 5)),  # before year 1 in UTC
        ("new", forged("new", "9999-12-31T23:59:59-01:00", 5)),  # after year 9999 in UTC
    ]
    for sort, cursor in cursors:
        response = await site.get(f"/g/{GUILD}?sort={sort}&after={cursor}")
        assert response.status_code == 400 and "first page" in response.text, cursor

    for style in ("%00", "a" * 65, "neon%20glow"):
        response = await site.get(f"/g/{GUILD}?style={style}")
        assert response.status_code == 400 and "a style&#39;s name" in response.text, style
    assert (await site.get(f"/g/{GUILD}?style={'a' * 64}")).status_code == 200
    assert (await site.get(f"/g/{GUILD}?sort=&period=")).status_code == 200  # the defaults


@sqlite_only
async def test_the_gallery_filters_by_style_and_falls_back_to_the_png_without_thumbnails(
    site: Site,
) -> None:
    await site.policy(web_enabled=True)
    [plain] = await site.make("a plain fox", thumbnails=False)
    [styled] = await site.make("a washed fox --style watercolor")
    await site.make("a hidden fox --style neon", private=True)  # no visible image: no filter
    page = (await site.get(f"/g/{GUILD}")).text
    assert f'<a class="style-filter" href="/g/{GUILD}?style=watercolor">watercolor</a>' in page
    assert "style=neon" not in page
    assert card_ids(page) == [styled, plain]
    key = await site.blob_key(plain)
    # Without a thumbnail the browser scales the PNG itself.
    assert re.search(
        rf'<a class="card" href="/i/{plain}"><img class="thumb" src="/media/{key}.png" '
        r'alt="a plain fox" loading="lazy" width="96" height="64">',
        page,
    )
    styled_key = await site.blob_key(styled)
    assert f'src="/media/{styled_key}-256.webp"' in page
    filtered = (await site.get(f"/g/{GUILD}?style=watercolor")).text
    assert card_ids(filtered) == [styled]
    assert card_ids((await site.get(f"/g/{GUILD}?style=nothing")).text) == []

    made, skipped = await backfill_thumbnails(site.database, site.blobs)
    assert (made, skipped) == (1, 0)
    page = (await site.get(f"/g/{GUILD}")).text
    assert f'src="/media/{key}-256.webp"' in page
    assert await backfill_thumbnails(site.database, site.blobs) == (0, 0)


@sqlite_only
async def test_the_image_page_has_its_recipe_command_lineage_and_link_preview(site: Site) -> None:
    await site.policy(web_enabled=True)
    text = "a lighthouse & <harbour> --ar 3:2 --seed 42 --no fog, rain --steps 7 --cfg 4.5"
    first, second = await site.make(text, images=2)
    [variation] = await site.make(text, kind=GenerationKind.VARIATION, parent=first, requester=BOB)
    [upscale] = await site.make(text, kind=GenerationKind.UPSCALE, parent=first)
    [hidden] = await site.make(text, kind=GenerationKind.VARIATION, parent=first, private=True)
    async with site.database.session() as session:
        await like(session, BOB, first)
        await like(session, ALICE, first)

    response = await site.get(f"/i/{first}")
    assert response.status_code == 200
    page = response.text
    key = await site.blob_key(first)
    assert f'<meta property="og:image" content="{PUBLIC}/media/{key}.png">' in page
    assert f'<meta property="og:url" content="{PUBLIC}/i/{first}">' in page
    assert '<meta name="twitter:card" content="summary_large_image">' in page
    # 96 x 64 px: shown in square pixels, scaled up to the column.
    assert f'<img class="full pixels" src="/media/{key}-768.webp"' in page
    assert '<span class="likes">2</span>' in page
    assert f'<a class="user" href="/g/{GUILD}/u/{ALICE}">' in page
    assert f'<a class="download" href="/media/{key}.png"' in page
    assert "<dt>Seed</dt><dd>42</dd>" in page and "&lt;harbour&gt;" in page
    assert '<dl class="recipe">' in page and '<button id="copy-command"' in page
    lineage = page[page.index('<section class="lineage">') :]
    assert f'<a class="child" href="/i/{variation}">' in lineage
    assert f'<a class="child" href="/i/{upscale}">' in lineage
    assert f'<a class="sibling" href="/i/{second}">' in lineage
    assert f"/i/{hidden}" not in lineage

    command = re.search(r'<code id="imagine-command">(.*?)</code>', page, re.S)
    assert command is not None
    async with site.database.session() as session:
        row = await session.get(Image, first)
        assert row is not None
        stored = await session.get(Generation, row.generation_id)
        assert stored is not None
    assert parse_prompt(html.unescape(command.group(1)), DEFAULTS) == [stored.recipe]

    child = (await site.get(f"/i/{variation}")).text
    assert f'<a class="parent" href="/i/{first}">' in child
    assert f'<a class="user" href="/g/{GUILD}/u/{BOB}">' in child
    mine = (await site.get(f"/g/{GUILD}/u/{BOB}")).text
    assert card_ids(mine) == [variation]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts)
def test_the_copied_command_parses_back_to_the_image_recipe(text: str) -> None:
    try:
        recipes = parse_prompt(text, DEFAULTS, random_seed=lambda: 77)
    except PromptError:
        return
    recipe = recipes[0]
    image = WebImage(
        id=1,
        generation_id=1,
        index=0,
        guild_id=GUILD,
        requester_id=ALICE,
        recipe=recipe,
        kind=GenerationKind.IMAGINE,
        blob_key="0" * 64,
        width=recipe.width,
        height=recipe.height,
        created_at=datetime.now(UTC),
        likes=0,
    )
    page = render_image_page(image)
    command = re.search(r'<code id="imagine-command">(.*?)</code>', page, re.S)
    assert command is not None
    assert parse_prompt(html.unescape(command.group(1)), DEFAULTS) == [recipe]


def render_image_page(image: WebImage) -> str:
    return TEMPLATES.get_template("image.html").render(
        image=image,
        shown={"src": "/x", "width": 1, "height": 1},
        command=format_recipe(image.recipe),
        detail=ImageDetail(image, None, [], []),
        page_url=f"{PUBLIC}/i/1",
        og_image=f"{PUBLIC}/media/x.png",
        png="/media/x.png",
    )


TEMPLATES = make_templates()


@sqlite_only
async def test_the_styles_page_lists_every_style_with_preview_and_best_images(site: Site) -> None:
    await site.policy(web_enabled=True)
    [preview] = await site.make("a neon street --style neon")
    [liked] = await site.make("a neon cat --style neon")
    [washed] = await site.make("a washed fox --style watercolor")
    async with site.database.session() as session:
        await like(session, BOB, liked)
        session.add(
            Style(
                guild_id=GUILD,
                name="neon",
                description="Glowing signs & tubes",
                trigger_words=["neon glow"],
                base_model_family="tiny-sd",
                preview_image_id=preview,
            )
        )
    page = (await site.get(f"/g/{GUILD}/styles")).text
    neon = page[page.index('<section class="style" id="style-neon">') :]
    neon = neon[: neon.index("</section>")]
    assert "Glowing signs &amp; tubes" in neon and "<code>neon glow</code>" in neon
    assert f'<a href="/i/{preview}"><img class="preview"' in neon
    assert card_ids(neon) == [liked, preview]
    water = page[page.index('<section class="style" id="style-watercolor">') :]
    assert "Soft washes of colour" in water and card_ids(water)[:1] == [washed]


# -- media --------------------------------------------------------------------------------------


@sqlite_only
async def test_media_is_cached_briefly_with_etags_and_refuses_anything_else(site: Site) -> None:
    await site.policy(web_enabled=True)
    [image] = await site.make()
    key = await site.blob_key(image)
    png = await site.get(f"/media/{key}.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == await site.blobs.get(key)
    assert png.headers["cache-control"] == "public, max-age=300"  # hidden: gone in 5 min
    assert png.headers["etag"] == f'"{key}"'
    again = await site.get(f"/media/{key}.png", **{"If-None-Match": f'"{key}"'})
    assert again.status_code == 304 and again.content == b""

    for size in THUMBNAIL_SIZES:
        webp = await site.get(f"/media/{key}-{size}.webp")
        assert webp.status_code == 200 and webp.headers["content-type"] == "image/webp"
        etag = webp.headers["etag"]
        assert etag != f'"{key}"' and webp.headers["cache-control"] == "public, max-age=300"
        with PILImage.open(io.BytesIO(webp.content)) as picture:
            assert picture.format == "WEBP" and picture.size == (96, 64)
        cached = await site.get(f"/media/{key}-{size}.webp", **{"If-None-Match": etag})
        assert cached.status_code == 304

    # A cache asking again about an image taken off the gallery is told it is gone.
    async with site.database.session() as session:
        await remove_from_gallery(session, image, by=ALICE)
    gone = await site.get(f"/media/{key}.png", **{"If-None-Match": f'"{key}"'})
    assert gone.status_code == 404

    for path in (
        f"/media/{key}-512.webp",  # no such size
        f"/media/{key}.jpg",
        f"/media/{key.upper()}.png",
        "/media/..%2F..%2Fimagine.db",
        "/media/../../etc/passwd",
        "/static/../app.py",
        "/static/..%2Fapp.py",
        "/static/%2e%2e/templates/base.html",
        f"/media/{'0' * 64}.png",
    ):
        assert (await site.get(path)).status_code == 404, path


# -- headers and limits --------------------------------------------------------------------------


@sqlite_only
async def test_every_answer_carries_strict_security_headers_and_no_inline_script(
    site: Site,
) -> None:
    await site.policy(web_enabled=True)
    [image] = await site.make()
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    for path in (
        f"/g/{GUILD}",
        f"/g/{GUILD}/styles",
        f"/g/{GUILD}/u/{ALICE}",
        f"/i/{image}",
        "/i/1234567",
        "/static/style.css",
        "/static/gallery.js",
        "/static/image.js",
        "/healthz",
        "/nowhere",
    ):
        response = await site.get(path)
        assert response.status_code in (200, 404), path
        headers = response.headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
        if headers["content-type"].startswith("text/html"):
            body = response.text
            assert "<script" in body or path != f"/i/{image}"
            assert not re.search(r"<script(?![^>]*\ssrc=)", body), path  # no inline script
            assert not re.search(r"<[^>]+\s(on\w+|style)=", body), path  # no inline handlers
            assert "<style" not in body, path
    assert (await site.get("/healthz")).text == "ok"


@sqlite_only
async def test_a_client_past_its_budget_gets_429_with_retry_after(database: Database) -> None:
    now = [1000.0]
    app = create_app(
        database, LocalBlobStore(Path("/nonexistent")), requests_per_minute=3, clock=lambda: now[0]
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("203.0.113.7", 1234)),
        base_url="http://testserver",
    ) as client:
        statuses = [(await client.get(f"/g/{GUILD}")).status_code for _ in range(3)]
        assert statuses == [404, 404, 404]  # a miss counts too
        limited = await client.get(f"/i/{GUILD}")
        assert limited.status_code == 429 and limited.headers["retry-after"] == "20"
        assert limited.headers["x-content-type-options"] == "nosniff"
        assert (await client.get("/healthz")).status_code == 200  # never limited
        assert (await client.get("/static/style.css")).status_code == 200  # nor CSS and JS
        now[0] += 21  # a request's worth of budget back
        assert (await client.get(f"/g/{GUILD}")).status_code == 404
        assert (await client.get(f"/g/{GUILD}")).status_code == 429
    async with httpx.AsyncClient(  # another client has its own budget
        transport=httpx.ASGITransport(app=app, client=("198.51.100.9", 1)),
        base_url="http://testserver",
    ) as other:
        assert (await other.get(f"/g/{GUILD}")).status_code == 404


# -- serving -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def healthz(port: int) -> httpx.Response:
    """/healthz of a server on ``port`` once it listens (within 10 s)."""
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                return await client.get(f"http://127.0.0.1:{port}/healthz")
            except httpx.ConnectError:
                await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


@sqlite_only
async def test_the_server_answers_on_its_port_and_stops_with_its_owner(site: Site) -> None:
    from bot.web.server import serve

    port = free_port()
    app = create_app(site.database, site.blobs)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(app, "127.0.0.1", port, stop))
    response = await healthz(port)
    assert response.text == "ok" and "server" not in response.headers
    stop.set()
    await asyncio.wait_for(serving, 10)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{busy}"):
            await asyncio.wait_for(serve(app, "127.0.0.1", busy, asyncio.Event()), 10)


async def test_imagine_web_serves_until_sigterm(clean_env: Path) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "web",
        "--port",
        str(port),
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert f"http://127.0.0.1:{port}/g/" in line.decode()
        assert (await healthz(port)).text == "ok"
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/g/{GUILD}")).status_code == 404
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_imagine_thumbnails_makes_the_missing_ones_once(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def seed() -> list[int]:
        async with open_deployment(load_settings()) as deployment:
            site = Site(deployment.database, deployment.blobs)
            return await site.make(images=2, thumbnails=False) + await site.make()

    older_a, older_b, newer = asyncio.run(seed())
    assert main(["thumbnails"]) == 0
    assert "Made thumbnails for 2 image(s); 0 had no readable PNG." in capsys.readouterr().out

    async def recorded() -> set[tuple[int, int]]:
        database = Database.from_settings(load_settings())
        try:
            async with database.session() as session:
                rows = await session.execute(select(Thumbnail.image_id, Thumbnail.size))
                return {(image, size) for image, size in rows}
        finally:
            await database.dispose()

    expected = {(i, size) for i in (older_a, older_b, newer) for size in THUMBNAIL_SIZES}
    assert asyncio.run(recorded()) == expected


# -- from Discord ---------------------------------------------------------------------------------


async def test_policy_web_turns_the_site_on_and_discord_links_to_its_pages(
    running: Harness,
) -> None:
    fake = running.fake
    running.services.settings.public_url = PUBLIC
    grid = await running.result(await running.imagine("a boat --steps 2 --seed 5"))
    single = await running.result(await running.press(grid, "U2"))
    [generation] = await running.generations()
    image_id = next(image.id for image in generation.images if image.index == 1)

    async def info() -> str:
        click = await running.press(single, "Info")
        await fake.wait_for(lambda: click.responses, what="the info")
        return str(click.responses[0]["data"]["content"])

    async def gallery() -> str:
        page = await running.result(await fake.slash("gallery", options={"sort": "new"}))
        return str(page["content"])

    assert "On the web" not in await info() and "on the web" not in await gallery()
    refused = await fake.slash("policy", subcommand="web", options={"state": "on"}, by=DISCORD_BOB)
    await fake.wait_for(lambda: refused.responses, what="the refusal")
    assert "Manage Server" in refused.responses[0]["data"]["content"]

    done = await fake.slash(
        "policy", subcommand="web", options={"state": "on"}, by=MOD, permissions=MANAGE_GUILD
    )
    await fake.wait_for(lambda: done.responses, what="the change")
    assert f"Web gallery: on: {PUBLIC}/g/{GUILD_ID}" in done.responses[0]["data"]["content"]
    assert f"On the web: <{PUBLIC}/i/{image_id}>" in await info()
    assert f"<{PUBLIC}/g/{GUILD_ID}?sort=new&period=week>" in await gallery()
    nsfw = await fake.slash(
        "policy", subcommand="web-nsfw", options={"state": "on"}, by=MOD, permissions=MANAGE_GUILD
    )
    await fake.wait_for(lambda: nsfw.responses, what="the second change")
    assert "(NSFW prompts shown)" in nsfw.responses[0]["data"]["content"]
    async with running.database.session() as session:
        changes = list(await session.scalars(select(PolicyChange).order_by(PolicyChange.id)))
        guild = await session.get(Guild, GUILD_ID)
    assert [(c.user_id, c.change) for c in changes] == [
        (int(MOD["id"]), "web gallery: on"),
        (int(MOD["id"]), "NSFW images on the web gallery: on"),
    ]
    assert guild is not None and guild.web_enabled and guild.web_nsfw


async def test_a_private_image_and_what_is_made_from_it_stay_private(bot_only: Harness) -> None:
    png = io.BytesIO()
    PILImage.new("RGB", (64, 64), "green").save(png, format="PNG")
    key = await bot_only.services.blobs.put(png.getvalue())
    async with bot_only.database.session() as session:
        generation = await create_generation(
            session,
            kind=GenerationKind.IMAGINE,
            recipe=recipe_of("a secret garden"),
            requester_id=int(DISCORD_ALICE["id"]),
            origin=Origin(guild_id=GUILD_ID),
            private=True,
        )
        await transition(session, generation.id, S.RUNNING, worker_name="w")
        [image] = await add_images(session, generation.id, [NewImage(0, 5, 64, 64, key, key)])
        await transition(session, generation.id, S.SUCCEEDED)
    # The server's /gallery in Discord does not show it either: it is its author's alone.
    page = await bot_only.result(await bot_only.fake.slash("gallery", options={"sort": "new"}))
    assert "No images here yet" in page["content"]
    await click(bot_only, f"img:{image.id}:subtle")  # Vary (Subtle), by its author
    for _ in range(400):
        rows = await bot_only.generations()
        if len(rows) == 2:
            break
        await asyncio.sleep(0.05)
    _, variation = rows
    assert variation.kind is GenerationKind.VARIATION and variation.parent_image_id == image.id
    assert variation.private  # its prompt is the private one's
