"""The web gallery in a real browser: Debian's headless Chromium, driven by Selenium,
over a gallery of images that the tiny model really made, served by uvicorn on a free
localhost port.

One test walks what a visitor does: scrolls past the first page, filters by a style,
opens a variation and follows its lineage both ways. It saves screenshots under its
temporary folder; with ``UPDATE_SCREENSHOTS=1`` it also writes them to
``docs/screenshots/``, which README shows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from generation.engine import Engine
from generation.jobs import run_generation
from storage.blobs import LocalBlobStore
from storage.database import Database, parse_database_url
from storage.gallery import like
from storage.generations import Origin, create_generation, get_generation
from storage.models import GenerationKind, Guild
from storage.recipe import Recipe, StyleRef
from storage.settings import Settings
from tests.test_docs import tool
from tests.test_styles import styled_engine, styles_dir

__all__ = ["styled_engine", "styles_dir"]

ROOT = Path(__file__).resolve().parent.parent
GUILD = 7100
ALICE, BOB, CAROL = 501, 502, 503
PAGE_SIZE = 24
# Without the background-networking switches Chromium keeps reaching for the network,
# which this closed machine refuses, and stalls.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


@dataclass
class Gallery:
    """What the seeding made, for the test to check the pages against."""

    images: list[int] = field(default_factory=list)
    styled: dict[str, list[int]] = field(default_factory=dict)
    variation_source: int = 0
    variation_image: int = 0
    upscale_image: int = 0
    likes: dict[int, int] = field(default_factory=dict)
    prompts: dict[int, str] = field(default_factory=dict)


def _recipe(prompt: str, seed: int, **changes: Any) -> Recipe:
    values: dict[str, Any] = {
        "model": "tiny",
        "prompt": prompt,
        "seed": seed,
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance": 5.0,
    }
    values.update(changes)
    return Recipe.model_validate(values)


async def _run(
    database: Database,
    blobs: LocalBlobStore,
    engine: Engine,
    gallery: Gallery,
    kind: GenerationKind,
    recipe: Recipe,
    requester: int,
    parent: int | None = None,
) -> list[int]:
    async with database.session() as session:
        generation = await create_generation(
            session,
            kind=kind,
            recipe=recipe,
            requester_id=requester,
            origin=Origin(guild_id=GUILD, channel_id=1),
            parent_image_id=parent,
        )
    await run_generation(database, blobs, engine, generation.id, worker_name="seed")
    async with database.session() as session:
        done = await get_generation(session, generation.id)
    ids = [image.id for image in done.images]
    gallery.images += ids
    for style in recipe.styles:
        gallery.styled.setdefault(style.name, []).extend(ids)
    gallery.prompts.update(dict.fromkeys(ids, recipe.prompt))
    return ids


async def seed(settings: Settings, engine: Engine) -> Gallery:
    """Real generations through the tiny model: nine grids in three looks, a variation and
    an upscale of one image, and likes; 41 images, more than a page."""
    from migrations import runner

    gallery = Gallery()
    database = Database(parse_database_url(settings.resolved_database_url))
    blobs = LocalBlobStore(settings.resolved_blob_dir)
    try:
        await runner.upgrade(database)
        async with database.session() as session:
            session.add(Guild(id=GUILD, web_enabled=True))
        looks: list[tuple[StyleRef, ...]] = [
            (),
            (StyleRef(name="watercolor", weight=0.8),),
            (StyleRef(name="neon", weight=1.0),),
        ]
        subjects = ["a lighthouse at dusk", "a fox in the snow", "a tram in the rain"]
        for number in range(9):
            prompt = f"{subjects[number % 3]}, study {number}"
            recipe = _recipe(prompt, seed=100 + number, styles=looks[number // 3])
            await _run(database, blobs, engine, gallery, GenerationKind.IMAGINE, recipe, ALICE)
        source = gallery.images[5]
        gallery.variation_source = source
        variation = _recipe(
            gallery.prompts[source], seed=900, strength=0.35, source_image_id=source
        )
        [gallery.variation_image, *_] = await _run(
            database, blobs, engine, gallery, GenerationKind.VARIATION, variation, BOB, source
        )
        upscale = _recipe(
            gallery.prompts[source],
            seed=901,
            count=1,
            scale=2,
            width=128,
            height=128,
            source_image_id=source,
        )
        [gallery.upscale_image] = await _run(
            database, blobs, engine, gallery, GenerationKind.UPSCALE, upscale, CAROL, source
        )
        async with database.session() as session:
            for image, fans in ((source, (ALICE, BOB, CAROL)), (gallery.variation_image, (BOB,))):
                for fan in fans:
                    gallery.likes[image] = await like(session, fan, image)
    finally:
        await database.dispose()
    return gallery


class Server:
    """The gallery app under uvicorn, on a socket bound here to a free localhost port, on a
    thread with its own event loop (where its database connections live too)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server: Any = None
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="web-gallery", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start() or stop(), on the test's thread
            self.failure = exc

    async def _serve(self) -> None:
        import uvicorn

        from bot.deployment import open_deployment
        from bot.web.server import gallery_app
        from generation.styles import StyleRegistry

        styles = StyleRegistry.from_folder(self.settings.resolved_styles_dir)
        async with open_deployment(self.settings) as deployment:
            # The same app `imagine web` serves, on the socket bound above.
            config = uvicorn.Config(gallery_app(deployment, styles), log_level="warning")
            self.server = uvicorn.Server(config)
            await self.server.serve(sockets=[self.socket])

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not (self.server is not None and self.server.started):
            if self.failure is not None or not self.thread.is_alive():
                raise RuntimeError(f"the web gallery did not start: {self.failure!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("the web gallery did not start within 20 s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(timeout=20)
        self.socket.close()
        assert not self.thread.is_alive(), "the web gallery did not stop"
        if self.failure is not None:
            raise self.failure


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium through Debian's chromedriver, with a profile of its own."""
    binary = tool("chromium", "apt-get install chromium chromium-driver; .ci/run installs them")
    driver_path = tool("chromedriver", "apt-get install chromium-driver; .ci/run installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, folder: Path, name: str) -> None:
    """Saved under the test's folder; copied to docs/screenshots/ with UPDATE_SCREENSHOTS=1."""
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"Chromium took no screenshot of {name}"
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(path, ROOT / "docs" / "screenshots" / path.name)


def wait_for(condition: Any, what: str, within: float = 15.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the browser never showed {what} within {within:.0f} s")
        time.sleep(0.05)


def loaded(driver: Any, selector: str) -> bool:
    """Every <img> matching ``selector`` finished loading and decoded to real pixels."""
    return bool(
        driver.execute_script(
            "const imgs = [...document.querySelectorAll(arguments[0])];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);",
            selector,
        )
    )


def test_a_visitor_scrolls_filters_and_follows_an_images_lineage(
    chromium: Any, styled_engine: Engine, styles_dir: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    settings = Settings(
        data_dir=tmp_path / "data",
        model="tiny",
        device="cpu",
        styles_dir=styles_dir,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'imagine.db'}",
        # A page pulls its thumbnails and the pages after it: far past a visitor's budget.
        web_requests_per_minute=100_000,
    )
    gallery = asyncio.run(seed(settings, styled_engine))
    assert len(gallery.images) > PAGE_SIZE
    server = Server(settings)
    server.start()
    driver = chromium
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:

        def card_ids() -> list[int]:
            links = driver.find_elements(By.CSS_SELECTOR, "a.card")
            return [int(link.get_attribute("href").rsplit("/", 1)[1]) for link in links]

        # The first page: the newest 24, thumbnails (not the PNGs) loaded.
        driver.get(f"{server.url}/g/{GUILD}")
        assert card_ids() == sorted(gallery.images, reverse=True)[:PAGE_SIZE]
        thumbs = driver.find_elements(By.CSS_SELECTOR, "img.thumb")
        assert all(t.get_attribute("src").endswith("-256.webp") for t in thumbs)
        wait_for(lambda: loaded(driver, "a.card:nth-child(-n+8) img.thumb"), "the first thumbnails")
        screenshot(driver, shots, "gallery")

        # Scrolling to the end brings in the rest, page after page, until no next link.
        for _ in range(4):
            driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
            if len(card_ids()) == len(gallery.images):
                break
            time.sleep(0.2)
        wait_for(lambda: len(card_ids()) == len(gallery.images), "every card after scrolling")
        assert card_ids() == sorted(gallery.images, reverse=True)
        wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, "a.next"), "the end")

        # A style filter keeps only that style's images.
        driver.execute_script("window.scrollTo(0, 0)")
        driver.find_element(By.CSS_SELECTOR, "a.style-filter[href$='style=watercolor']").click()
        wait_for(lambda: "style=watercolor" in driver.current_url, "the watercolor filter")
        assert sorted(card_ids()) == sorted(gallery.styled["watercolor"])
        wait_for(lambda: loaded(driver, "img.thumb"), "the watercolor thumbnails")
        screenshot(driver, shots, "style")

        # The variation: its recipe, the command that remakes it, its likes, its parent.
        driver.get(f"{server.url}/g/{GUILD}")
        driver.find_element(By.CSS_SELECTOR, f"a.card[href='/i/{gallery.variation_image}']").click()
        wait_for(lambda: driver.current_url.endswith(f"/i/{gallery.variation_image}"), "the image")
        recipe = driver.find_element(By.CSS_SELECTOR, "dl.recipe").text
        prompt = gallery.prompts[gallery.variation_image]
        assert prompt in recipe and "900" in recipe and "0.35" in recipe and "variation" in recipe
        command = driver.find_element(By.ID, "imagine-command").text
        assert command.startswith(prompt) and "--seed 900" in command
        likes = driver.find_element(By.CSS_SELECTOR, "span.likes").text
        assert likes == str(gallery.likes[gallery.variation_image])
        wait_for(lambda: loaded(driver, "img.full"), "the image itself")
        full = driver.find_element(By.CSS_SELECTOR, "img.full")
        column = full.find_element(By.XPATH, "./..")  # the link that is the grid's cell
        # The 64-px picture fills its column, in square pixels rather than a blur.
        assert full.size["width"] > 4 * 64 and full.size["width"] >= column.size["width"] - 1
        assert full.value_of_css_property("image-rendering") == "pixelated"
        screenshot(driver, shots, "image")

        parent = driver.find_element(By.CSS_SELECTOR, "section.lineage a.parent")
        assert parent.get_attribute("href").endswith(f"/i/{gallery.variation_source}")
        parent.click()
        wait_for(lambda: driver.current_url.endswith(f"/i/{gallery.variation_source}"), "parent")
        children = {
            int(a.get_attribute("href").rsplit("/", 1)[1])
            for a in driver.find_elements(By.CSS_SELECTOR, "section.lineage a.child")
        }
        assert {gallery.variation_image, gallery.upscale_image} <= children
        assert driver.find_element(By.CSS_SELECTOR, "span.likes").text == "3"
        wait_for(lambda: loaded(driver, "img.full"), "the source image")
        section = driver.find_element(By.CSS_SELECTOR, "section.lineage")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", section)
        screenshot(driver, shots, "lineage")

        # The styles page has a section per style used here.
        driver.get(f"{server.url}/g/{GUILD}/styles")
        for name in ("watercolor", "neon"):
            assert driver.find_elements(By.CSS_SELECTOR, f"section.style#style-{name}")
    finally:
        server.stop()
