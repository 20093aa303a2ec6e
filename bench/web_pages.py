"""Server time of the web gallery's pages over 10,000 images, on SQLite and PostgreSQL.

Seeds one server's gallery in bulk (rows inserted through SQLAlchemy; a few real PNGs
and their WebP thumbnails shared by all rows, since this measures the server, not
diffusion): 10,000 images from 2,500 generations over four weeks, one in ten a variation
of an earlier image, eight styles, up to six likes an image. Then it asks for each page
``--requests`` times and prints p50 / p99 server time, and the SQL statements one
request sends, of

  floor    SELECT 1 in a session of its own: one statement's cost on this machine now
  gallery  /g/<guild> newest first, most liked (this week, all time), and five pages
           deep through the next link
  style    /g/<guild>?style=<name> and /g/<guild>/styles
  image    /i/<image> of random images (recipe, likes, lineage)

plus the bytes of one gallery page with its thumbnails against the same page with the
full PNGs, and their ratio. Target: p99 under 50 ms for every page.

Server time is measured in-process: each request is one call of the ASGI app (the app
that `imagine web` serves, rate limit raised), timed from the call to the last chunk of
the body it sends, with no socket and no HTTP client in between.

    python bench/web_pages.py [--images 10000] [--requests 200]
        [--url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from sqlalchemy import event, insert, text, update  # noqa: E402
from sqlalchemy.engine import URL, make_url  # noqa: E402

from bot.web.app import create_app  # noqa: E402
from generation.thumbnails import encode_thumbnails  # noqa: E402
from migrations import runner  # noqa: E402
from storage.blobs import LocalBlobStore  # noqa: E402
from storage.database import Database, parse_database_url  # noqa: E402
from storage.models import (  # noqa: E402
    Generation,
    GenerationKind,
    GenerationStatus,
    GenerationStyle,
    Guild,
    Image,
    Like,
    Style,
    Thumbnail,
    User,
)
from storage.recipe import Recipe, StyleRef  # noqa: E402

GUILD = 4242
STYLES = ["watercolor", "inkwash", "pixel", "neon", "charcoal", "pastel", "noir", "lowpoly"]
USERS = 200
TARGET_MS = 50.0

Message = MutableMapping[str, Any]
App = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def picture(seed: int, size: int = 512) -> PILImage.Image:
    """A smooth random picture: compresses like a generated image, not like noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = PILImage.fromarray(small).resize((size, size), PILImage.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (size, size, 3))
    return PILImage.fromarray(np.clip(np.asarray(base) + grain, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class Blobs:
    """The few real files every row shares: the PNGs' keys, and each PNG's thumbnails
    (size: key, width, height)."""

    pngs: list[str]
    thumbnails: list[dict[int, tuple[str, int, int]]]


async def store_blobs(store: LocalBlobStore, count: int = 4) -> Blobs:
    """``count`` real PNGs and their thumbnails, made the way the worker makes them."""
    pngs, thumbnails = [], []
    for number in range(count):
        image = picture(number)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(await store.put(buffer.getvalue()))
        thumbnails.append(
            {
                size: (await store.put(data), width, height)
                for size, width, height, data in encode_thumbnails(image)
            }
        )
    return Blobs(pngs, thumbnails)


def _recipe(number: int, styles: tuple[StyleRef, ...], source: int | None) -> Recipe:
    return Recipe(
        model="tiny",
        model_hash="0" * 16,
        model_family="sd15",
        prompt=f"a lighthouse at dusk, number {number}",
        negative_prompt="blurry",
        seed=number * 4,
        width=512,
        height=512,
        steps=30,
        guidance=7.0,
        styles=styles,
        strength=0.35 if source is not None else None,
        source_image_id=source,
    )


async def seed(database: Database, blobs: Blobs, images: int) -> None:
    """``images`` images of one server in bulk inserts; ids are assigned here."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    generations = images // 4
    step = timedelta(days=28) / generations
    gen_rows: list[dict[str, Any]] = []
    style_rows: list[dict[str, Any]] = []
    image_rows: list[dict[str, Any]] = []
    thumb_rows: list[dict[str, Any]] = []
    like_rows: list[dict[str, Any]] = []
    for number in range(1, generations + 1):
        at = now - step * (generations - number)
        source = rng.randint(1, (number - 1) * 4) if number > 10 and rng.random() < 0.1 else None
        styles = (StyleRef(name=rng.choice(STYLES), weight=0.8),) if rng.random() < 0.4 else ()
        gen_rows.append(
            {
                "id": number,
                "kind": GenerationKind.VARIATION if source else GenerationKind.IMAGINE,
                "parent_image_id": source,
                "requester_id": rng.randint(1, USERS),
                "guild_id": GUILD,
                "channel_id": 1,
                "recipe": _recipe(number, styles, source),
                "model": "tiny",
                "status": GenerationStatus.SUCCEEDED,
                "queued_at": at,
                "started_at": at,
                "finished_at": at,
                "delivered_at": at,
            }
        )
        style_rows += [
            {"generation_id": number, "style_name": s.name, "weight": s.weight} for s in styles
        ]
        for index in range(4):
            image_id = (number - 1) * 4 + index + 1
            shared = image_id % len(blobs.pngs)
            fans = rng.sample(range(1, USERS + 1), rng.choice([0, 0, 0, 1, 2, 3, 6]))
            image_rows.append(
                {
                    "id": image_id,
                    "generation_id": number,
                    "index": index,
                    "seed": number * 4 + index,
                    "width": 512,
                    "height": 512,
                    "blob_key": blobs.pngs[shared],
                    "sha256": blobs.pngs[shared],
                    "created_at": at,
                    "like_count": len(fans),
                }
            )
            for size, (key, width, height) in blobs.thumbnails[shared].items():
                thumb_rows.append(
                    {
                        "image_id": image_id,
                        "size": size,
                        "blob_key": key,
                        "width": width,
                        "height": height,
                        "created_at": at,
                    }
                )
            for user in fans:
                like_rows.append({"user_id": user, "image_id": image_id, "created_at": at})
    async with database.session() as session:
        await session.execute(insert(Guild).values(id=GUILD, web_enabled=True))
        await session.execute(
            insert(User),
            [{"id": n, "settings": {}, "created_at": now} for n in range(1, USERS + 1)],
        )
        # Images need their generation, and a generation's parent is an image: the
        # parents go in last.
        parents = {row["id"]: row.pop("parent_image_id") for row in gen_rows}
        for table, rows in (
            (Generation, gen_rows),
            (Image, image_rows),
            (GenerationStyle, style_rows),
            (Thumbnail, thumb_rows),
            (Like, like_rows),
        ):
            for chunk in _chunks(rows):
                await session.execute(insert(table), chunk)
        await session.execute(
            update(Generation),
            [{"id": g, "parent_image_id": p} for g, p in parents.items() if p is not None],
        )
        await session.execute(
            insert(Style),
            [
                {
                    "guild_id": GUILD,
                    "name": name,
                    "description": f"The {name} look",
                    "trigger_words": [name],
                    "base_model_family": "sd15",
                    "created_at": now,
                }
                for name in STYLES
            ],
        )
    if database.url.get_backend_name() == "postgresql":
        # What autovacuum does after a bulk load like this one; without statistics the
        # planner guesses one row a table and nests loops over all 10,000.
        async with database.engine.begin() as connection:
            await connection.execute(text("ANALYZE"))
    print(
        f"seeded {len(image_rows)} images, {len(gen_rows)} generations, {len(like_rows)} likes, "
        f"{len(style_rows)} styled generations, {len(thumb_rows)} thumbnails",
        flush=True,
    )


def _chunks(rows: list[dict[str, Any]], size: int = 2000) -> list[list[dict[str, Any]]]:
    return [rows[start : start + size] for start in range(0, len(rows), size)]


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float


async def ask(app: App, url: str) -> Answer:
    """One GET through the ASGI app, timed from the call to the end of the body."""
    path, _, query = url.partition("?")
    scope: Message = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"bench.local"), (b"accept", b"text/html")],
        "client": ("127.0.0.1", 40000),
        "server": ("bench.local", 80),
    }
    chunks: list[bytes] = []
    status = 0
    received = False

    async def receive() -> Message:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    began = time.perf_counter()
    await app(scope, receive, send)
    return Answer(status, b"".join(chunks), time.perf_counter() - began)


def links(html: bytes, pattern: str) -> list[str]:
    return re.findall(pattern, html.decode())


async def timings(app: App, urls: list[str], requests: int) -> list[float]:
    """Milliseconds of ``requests`` GETs cycling through ``urls``, after one warm-up round."""
    for url in urls[:10]:
        await ask(app, url)
    spent = []
    for number in range(requests):
        answer = await ask(app, urls[number % len(urls)])
        if answer.status != 200:
            raise SystemExit(f"{urls[number % len(urls)]} answered {answer.status}")
        spent.append(answer.seconds * 1000)
    return spent


async def deep_page(app: App, start: str, pages: int) -> str:
    url = start
    for _ in range(pages):
        [url] = links((await ask(app, url)).body, r'<a class="next" rel="next" href="([^"]+)"')
        url = url.replace("&amp;", "&")
    return url


async def page_bytes(app: App, url: str) -> tuple[int, int, int]:
    """(cards, bytes of the page with its thumbnails, bytes of it with the full PNGs)."""
    page = await ask(app, url)
    thumbs = links(page.body, r'<img class="thumb" src="([^"]+)"')
    pngs = [re.sub(r"-\d+\.webp$", ".png", src) for src in thumbs]
    small = len(page.body) + sum([len((await ask(app, src)).body) for src in thumbs])
    full = len(page.body) + sum([len((await ask(app, src)).body) for src in pngs])
    return len(thumbs), small, full


async def round_trips(database: Database, count: int) -> list[float]:
    """Milliseconds of ``SELECT 1`` in a session of its own: what one statement costs on
    this machine now, before any page's work."""
    spent = []
    for _ in range(count):
        began = time.perf_counter()
        async with database.session() as session:
            await session.execute(text("SELECT 1"))
        spent.append((time.perf_counter() - began) * 1000)
    return spent


def count_statements(database: Database) -> list[str]:
    """The SQL statements sent from now on (cleared by the caller between pages)."""
    sent: list[str] = []

    @event.listens_for(database.engine.sync_engine, "before_cursor_execute")
    def _sent(*args: Any) -> None:
        sent.append(args[2])

    return sent


async def measure(label: str, url: URL, requests: int, images: int) -> bool:
    database = Database(url)
    with tempfile.TemporaryDirectory(prefix="imagine-bench-web-") as folder:
        try:
            await runner.upgrade(database)
            store = LocalBlobStore(Path(folder) / "blobs")
            began = time.perf_counter()
            await seed(database, await store_blobs(store), images)
            print(f"{label}: seeded in {time.perf_counter() - began:.1f}s", flush=True)
            app: App = create_app(database, store, requests_per_minute=10**9)
            rng = random.Random(3)
            gallery = f"/g/{GUILD}"
            pages = {
                "gallery, newest": [gallery],
                "gallery, top of the week": [f"{gallery}?sort=top&period=week"],
                "gallery, top of all time": [f"{gallery}?sort=top"],
                "gallery, page 6 (cursor)": [await deep_page(app, gallery, 5)],
                "style filter": [f"{gallery}?style={name}" for name in STYLES],
                "styles page": [f"{gallery}/styles"],
                "image page": [f"/i/{rng.randint(1, images)}" for _ in range(50)],
            }
            statements = count_statements(database)
            floor = await round_trips(database, requests)
            print(
                f"{label}: {'SELECT 1 (the floor)':26} p50 {statistics.median(floor):6.1f} ms  "
                f"p99 {percentile(floor, 0.99):6.1f} ms  (1 SQL statement, no page)",
                flush=True,
            )
            worst = 0.0
            for name, urls in pages.items():
                spent = await timings(app, urls, requests)
                p50, p99 = statistics.median(spent), percentile(spent, 0.99)
                worst = max(worst, p99)
                statements.clear()
                await ask(app, urls[0])
                print(
                    f"{label}: {name:26} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  "
                    f"({len(statements)} SQL statements)",
                    flush=True,
                )
            cards, small, full = await page_bytes(app, gallery)
            print(
                f"{label}: one gallery page ({cards} cards of 512x512): {small / 1024:.0f} KiB "
                f"with thumbnails, {full / 1024:.0f} KiB with the full PNGs, "
                f"ratio {full / small:.1f}x",
                flush=True,
            )
            met = worst < TARGET_MS
            print(
                f"{label}: target p99 < {TARGET_MS:.0f} ms on every page: "
                + ("met" if met else f"NOT met (worst {worst:.1f} ms)"),
                flush=True,
            )
            return met
        finally:
            await database.dispose()


async def main(admin_url: URL, requests: int, images: int) -> int:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average {load} (other work inflates p99)", flush=True)
    met = []
    with tempfile.TemporaryDirectory(prefix="imagine-bench-web-db-") as folder:
        sqlite_url = make_url(f"sqlite+aiosqlite:///{Path(folder) / 'imagine.db'}")
        met.append(await measure("sqlite", sqlite_url, requests, images))
    name = f"imagine_bench_{uuid.uuid4().hex[:8]}"
    dsn = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    await connection.execute(f'CREATE DATABASE "{name}"')
    try:
        met.append(await measure("postgresql", admin_url.set(database=name), requests, images))
    finally:
        await connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await connection.close()
    return 0 if all(met) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--images", type=int, default=10_000)
    arguments = parser.parse_args()
    sys.exit(
        asyncio.run(main(parse_database_url(arguments.url), arguments.requests, arguments.images))
    )
