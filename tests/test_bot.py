"""End to end: the real discord.py client against the local fake Discord, the tiny model.

Each test starts a fake Discord (gateway + REST on 127.0.0.1), the bot with an
embedded worker running the tiny random-weight model, and acts as users do.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select, update
from sqlalchemy.orm import selectinload

from bot.app import ImagineBot
from bot.deployment import open_deployment
from bot.prompt import format_recipe
from bot.services import Services
from bot.uploads import fit_upload
from generation.engine import Engine
from generation.metadata import read_recipe
from generation.styles import StyleRegistry
from generation.tiny import build_tiny_lora
from generation.worker import Worker
from storage.database import Database
from storage.gallery import like_count
from storage.generations import get_generation
from storage.models import Generation, GenerationKind, GenerationStatus, Guild, Image
from storage.queue import JobQueue
from storage.settings import Settings
from tests.conftest import migrated_database
from tests.fake_discord import (
    ALICE,
    BOB,
    EPHEMERAL,
    GUILD_ID,
    MANAGE_MESSAGES,
    MOD,
    OTHER_GUILD_ID,
    FakeDiscord,
    Interaction,
)

S = GenerationStatus
STYLE_COUNT = 30


@dataclass
class Harness:
    fake: FakeDiscord
    database: Database
    queue: JobQueue
    services: Services
    worker: Worker
    bot: ImagineBot | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def start_worker(self) -> None:
        self._stop = asyncio.Event()
        self._tasks.append(asyncio.create_task(self.worker.run(self._stop)))

    async def stop_worker(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self._tasks.clear()

    async def start_bot(self) -> ImagineBot:
        bot = ImagineBot(self.services)
        await bot.login("fake-token")
        connecting = asyncio.create_task(bot.connect(reconnect=False))
        await asyncio.wait_for(bot.wait_until_ready(), 20)
        self.bot = bot
        self._connecting = connecting
        return bot

    async def stop_bot(self) -> None:
        assert self.bot is not None
        await self.bot.close()
        await asyncio.gather(self._connecting, return_exceptions=True)
        self.bot = None

    # -- helpers ---------------------------------------------------------------------------

    async def imagine(
        self, prompt: str, *, by: dict[str, Any] = ALICE, **options: Any
    ) -> Interaction:
        return await self.fake.slash("imagine", by=by, options={"prompt": prompt, **options})

    async def result(self, interaction: Interaction) -> dict[str, Any]:
        """The interaction's message once it shows a finished generation's buttons."""

        def done() -> dict[str, Any] | None:
            message = self.fake.original(interaction)
            if message is not None and self.fake.buttons(int(message["id"])):
                return message
            return None

        message: dict[str, Any] = await self.fake.wait_for(done, what="a result")
        if self.bot is not None:
            await self.bot.delivery.idle()  # delivered_at is written after the edit
        return message

    async def press(self, message: dict[str, Any], label: str, **how: Any) -> Interaction:
        message_id = int(message["id"])
        return await self.fake.click(message_id, self.fake.button(message_id, label), **how)

    async def open_remix(self, message: dict[str, Any]) -> tuple[str, str]:
        """Press ✏️ Remix under ``message``: the modal's custom id and its pre-filled text."""
        click = await self.press(message, "Remix")
        await self.fake.wait_for(lambda: click.responses, what="the modal")
        modal = click.responses[0]["data"]
        return modal["custom_id"], modal["components"][0]["components"][0]["value"]

    async def generations(self) -> list[Generation]:
        async with self.database.session() as session:
            rows = await session.scalars(
                select(Generation).options(selectinload(Generation.images)).order_by(Generation.id)
            )
            return list(rows)


def png_size(data: bytes) -> tuple[int, int]:
    with PILImage.open(io.BytesIO(data)) as image:
        return image.size


@asynccontextmanager
async def make_harness(
    tmp_path: Path,
    tiny_engine: Engine,
    request: pytest.FixtureRequest,
    *,
    backend: str = "sqlite",
    upload_limit: int = 10 * 1024 * 1024,
) -> AsyncIterator[Harness]:
    """The bot and a worker. On PostgreSQL they share nothing but the database, as in
    the scaled mode: events travel by NOTIFY and the listener's sweep."""
    styles_dir = tmp_path / "styles"
    styles_dir.mkdir()
    denoiser = getattr(tiny_engine.pipe, "unet", None) or tiny_engine.pipe.transformer
    build_tiny_lora(denoiser, styles_dir / "lora.safetensors", seed=3)
    for number in range(STYLE_COUNT):
        (styles_dir / f"style-{number:02d}.toml").write_text(
            f'name = "style-{number:02d}"\nlora = "lora.safetensors"\n'
            f'description = "style number {number}"\n'
            f'base_model_family = "{tiny_engine.family.name}"\n'
        )
    registry = StyleRegistry.from_folder(styles_dir)
    saved_styles = tiny_engine.styles
    tiny_engine.styles = StyleRegistry.from_folder(styles_dir)  # its own, as in a worker
    fake = FakeDiscord(attachment_size_limit=upload_limit)
    await fake.start()
    fake.install()
    async with (
        migrated_database(backend, tmp_path, request) as database,
        open_deployment(
            Settings(
                data_dir=tmp_path,
                database_url=database.url.render_as_string(hide_password=False),
                model=tiny_engine.model_id,
                styles_dir=styles_dir,
                max_running_per_user=1,
                max_queued_per_user=10,
                image_origins=fake.base,  # the fake serves the attachments, as Discord's CDN
            )
        ) as deployment,
    ):
        # SQLite: the embedded mode. PostgreSQL: the scaled mode, as production wires it.
        services = Services.for_deployment(
            deployment, registry, tiny_engine.family, progress_interval=0.05
        )
        worker = Worker.for_deployment(deployment, tiny_engine, name="w", heartbeat_seconds=60)
        harness = Harness(fake, database, deployment.queue, services, worker)
        try:
            yield harness
        finally:
            if harness.bot is not None:
                await harness.stop_bot()
            await harness.stop_worker()
            fake.uninstall()
            await fake.stop()
            tiny_engine.styles = saved_styles


@pytest.fixture
async def harness(
    tmp_path: Path, tiny_engine: Engine, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    limit = getattr(request, "param", 10 * 1024 * 1024)
    async with make_harness(tmp_path, tiny_engine, request, upload_limit=limit) as harness:
        yield harness


@pytest.fixture
async def running(harness: Harness) -> Harness:
    await harness.start_worker()
    await harness.start_bot()
    return harness


# -- /imagine ---------------------------------------------------------------------------------


async def test_imagine_defers_shows_progress_and_posts_the_grid_with_buttons(
    running: Harness,
) -> None:
    fake = running.fake
    assert {"imagine", "info", "show", "queue", "cancel"} <= set(fake.command_names())
    interaction = await running.imagine("a lighthouse at dusk --steps 6 --seed 7")
    message = await running.result(interaction)

    assert interaction.response_type == 5  # deferred first
    assert interaction.responded_at is not None
    assert interaction.responded_at - interaction.sent_at < 3.0
    contents = [h["content"] for h in message["history"]]
    assert any("starting…" in content or "queued #1" in content for content in contents)
    assert any("% (" in content for content in contents), contents
    previews = [
        h
        for h in message["history"]
        if any(a["filename"].endswith(".jpg") for a in h["attachments"])
    ]
    assert previews, "no progress edit carried a preview"

    [grid] = fake.attachment_bytes(int(message["id"]))
    assert png_size(grid) == (192, 192)
    assert read_recipe(grid).seed == 7
    labels = [b.get("label") or b["emoji"]["name"] for b in fake.buttons(int(message["id"]))]
    assert labels == ["U1", "U2", "U3", "U4", "🔄", "V1", "V2", "V3", "V4", "Remix"]
    assert all(len(b["custom_id"]) <= 100 for b in fake.buttons(int(message["id"])))
    [generation] = await running.generations()
    assert generation.status is S.SUCCEEDED and generation.delivered_at is not None
    assert f"#{generation.id}" in message["content"]


async def test_a_bad_flag_gets_an_ephemeral_sentence_and_queues_nothing(running: Harness) -> None:
    interaction = await running.imagine("a cat --ar 99:1")
    await running.fake.wait_for(lambda: interaction.responses, what="a response")
    [response] = interaction.responses
    assert response["type"] == 4 and response["data"]["flags"] & EPHEMERAL
    assert "--ar" in response["data"]["content"]
    assert await running.generations() == []


async def test_an_unknown_style_is_refused_with_the_closest_names(running: Harness) -> None:
    interaction = await running.imagine("a cat", style="style-2")
    await running.fake.wait_for(lambda: interaction.responses, what="a response")
    content = interaction.responses[0]["data"]["content"]
    assert interaction.responses[0]["data"]["flags"] & EPHEMERAL
    assert "There is no style 'style-2'; did you mean style-" in content
    assert await running.generations() == []


async def test_style_autocomplete_reaches_more_than_25_styles(running: Harness) -> None:
    everything = await running.fake.autocomplete("imagine", "style", "", prompt="a cat")
    assert len(everything) == 25
    late = await running.fake.autocomplete("imagine", "style", "style-29", prompt="a cat")
    assert late[0]["value"] == "style-29"


async def test_a_style_option_reaches_the_recipe(running: Harness) -> None:
    interaction = await running.imagine("a cat --steps 2", style="style-29")
    await running.result(interaction)
    [generation] = await running.generations()
    assert [style.name for style in generation.recipe.styles] == ["style-29"]


async def test_a_banned_word_is_refused_before_queueing(running: Harness) -> None:
    async with running.database.session() as session:
        session.add(Guild(id=GUILD_ID, banned_words=["forbidden"]))
    interaction = await running.imagine("a Forbidden cat")
    followups = await running.fake.wait_for(
        lambda: running.fake.calls_to("POST", "/webhooks/"),
        what="a followup",
    )
    assert followups
    ephemeral = [m for m in running.fake.messages.values() if m["flags"] & EPHEMERAL]
    assert ephemeral and "forbidden" not in ephemeral[-1]["content"].lower()
    assert running.fake.original(interaction) is None  # the public "thinking…" was deleted
    assert await running.generations() == []


# -- buttons ----------------------------------------------------------------------------------


async def new_message(harness: Harness, interaction: Interaction) -> dict[str, Any]:
    return await harness.result(interaction)


async def test_u2_then_vary_subtle_and_upscale_and_v3(running: Harness) -> None:
    fake = running.fake
    grid = await running.result(await running.imagine("a boat --steps 2 --seed 11"))
    grid_id = int(grid["id"])

    single = await running.result(await fake.click(grid_id, fake.button(grid_id, "U2")))
    [tile] = fake.attachment_bytes(int(single["id"]))
    assert png_size(tile) == (96, 96) and read_recipe(tile).seed == 12  # seed + index
    labels = [b.get("label") for b in fake.buttons(int(single["id"]))]
    assert labels == [
        "Vary (Subtle)",
        "Vary (Strong)",
        "Upscale 2×",
        "Remix",
        "Zoom Out 2×",
        "Zoom Out 1.5×",
        None,  # ⬅️ ➡️ ⬆️ ⬇️: emoji only
        None,
        None,
        None,
        "0",
        "Info",
        "Delete",
    ]

    subtle = await running.result(await running.press(single, "Vary (Subtle)"))
    assert png_size(fake.attachment_bytes(int(subtle["id"]))[0]) == (192, 192)
    upscaled = await running.result(await running.press(single, "Upscale 2×"))
    [big] = fake.attachment_bytes(int(upscaled["id"]))
    assert png_size(big) == (192, 192)
    assert next(b["label"] for b in fake.buttons(int(upscaled["id"]))) == "Vary (Subtle)"
    v3 = await running.result(await fake.click(grid_id, fake.button(grid_id, "V3")))
    assert len(fake.buttons(int(v3["id"]))) == 10

    first, subtle_row, upscale_row, v3_row = await running.generations()
    images = sorted(first.images, key=lambda image: image.index)
    assert subtle_row.kind is GenerationKind.VARIATION and subtle_row.recipe.strength == 0.35
    assert subtle_row.parent_image_id == images[1].id
    assert upscale_row.kind is GenerationKind.UPSCALE and upscale_row.recipe.scale == 2
    assert v3_row.kind is GenerationKind.VARIATION and v3_row.recipe.strength == 0.7
    assert v3_row.parent_image_id == images[2].id


async def test_reroll_runs_the_same_recipe_from_new_noise(running: Harness) -> None:
    grid = await running.result(await running.imagine("a boat --steps 2 --seed 11"))
    rerolled = await running.result(await running.press(grid, "🔄"))
    assert rerolled["id"] != grid["id"]
    first, second = await running.generations()
    assert second.kind is GenerationKind.REROLL
    assert second.recipe.prompt == first.recipe.prompt and second.recipe.seed != first.recipe.seed


async def test_the_remix_modal_runs_the_edited_prompt_with_the_same_seed(running: Harness) -> None:
    fake = running.fake
    grid = await running.result(await running.imagine("a boat --steps 2 --seed 11"))
    click = await running.press(grid, "Remix")
    await fake.wait_for(lambda: click.responses, what="the modal")
    modal = click.responses[0]
    assert modal["type"] == 9
    text_input = modal["data"]["components"][0]["components"][0]
    assert text_input["value"].startswith("a boat --seed 11")
    edited = text_input["value"].replace("a boat", "a red boat")
    submitted = await fake.submit_modal(modal["data"]["custom_id"], {"prompt": edited})
    await running.result(submitted)
    source, remix = await running.generations()
    assert remix.kind is GenerationKind.REMIX
    assert remix.recipe.prompt == "a red boat" and remix.recipe.seed == 11
    # Its lineage, for the web gallery: it hangs under the first image of what it remixed.
    assert remix.parent_image_id == min(source.images, key=lambda i: i.index).id


async def test_buttons_keep_working_after_the_bot_restarts(running: Harness) -> None:
    fake = running.fake
    grid = await running.result(await running.imagine("a boat --steps 2"))
    await running.stop_bot()
    await running.start_bot()
    assert fake.identifies == 2
    single = await running.result(await running.press(grid, "U4"))
    rerolled = await running.result(await running.press(grid, "🔄"))
    assert single["attachments"] and rerolled["attachments"]


async def test_a_like_toggled_twice_leaves_the_count_where_it_started(running: Harness) -> None:
    fake = running.fake
    grid = await running.result(await running.imagine("a boat --steps 2"))
    single = await running.result(await running.press(grid, "U1"))
    single_id = int(single["id"])

    async def like(by: dict[str, Any]) -> str:
        click = await fake.click(
            single_id, fake.button(single_id, "Info").replace("info", "like"), by=by
        )
        await fake.wait_for(lambda: click.responses, what="the like")
        assert click.responses[0]["type"] == 7  # the message itself is updated
        [heart] = [b for b in fake.buttons(single_id) if b["custom_id"].endswith(":like")]
        return str(heart["label"])

    assert await like(BOB) == "1"
    assert await like(ALICE) == "2"
    assert await like(ALICE) == "1"
    image_id = int(fake.button(single_id, "Info").split(":")[1])
    async with running.database.session() as session:
        assert await like_count(session, image_id) == 1


async def test_info_is_ephemeral_and_reproduces_the_image(running: Harness) -> None:
    fake = running.fake
    grid = await running.result(await running.imagine("a boat --steps 2 --seed 5"))
    single = await running.result(await running.press(grid, "U3"))
    click = await running.press(single, "Info")
    await fake.wait_for(lambda: click.responses, what="the info")
    data = click.responses[0]["data"]
    assert data["flags"] & EPHEMERAL and "a boat --seed 7" in data["content"]


async def test_only_the_author_or_a_moderator_can_delete(running: Harness) -> None:
    fake = running.fake
    grid = await running.result(await running.imagine("a boat --steps 2"))
    single = await running.result(await running.press(grid, "U1"))
    single_id = int(single["id"])
    refused = await fake.click(single_id, fake.button(single_id, "Delete"), by=BOB)
    await fake.wait_for(lambda: refused.responses, what="the refusal")
    assert refused.responses[0]["data"]["flags"] & EPHEMERAL
    assert single_id in fake.messages
    await fake.click(
        single_id, fake.button(single_id, "Delete"), by=MOD, permissions=MANAGE_MESSAGES
    )
    await fake.wait_for(lambda: single_id in fake.deleted, what="the deletion")


# -- Discord's limits -------------------------------------------------------------------------


@pytest.mark.parametrize("harness", [20_000], indirect=True)
async def test_an_image_over_the_upload_limit_is_reencoded_to_fit(running: Harness) -> None:
    message = await running.result(await running.imagine("a boat --steps 2"))
    [attachment] = message["attachments"]
    assert attachment["size"] <= 20_000
    assert attachment["filename"].endswith((".webp", ".jpg"))
    [generation] = await running.generations()
    assert len(await running.services.blobs.get(generation.images[0].blob_key)) > 0
    assert generation.grid_blob_key is not None
    stored = await running.services.blobs.get(generation.grid_blob_key)
    assert len(stored) > 20_000  # the stored grid is kept whole; what was sent is its fit
    fitted = fit_upload(stored, f"imagine-{generation.id}", 20_000)
    assert running.fake.attachment_bytes(int(message["id"])) == [fitted.data]


async def test_an_expired_token_edits_the_message_with_the_bot_token(running: Harness) -> None:
    fake = running.fake
    await running.stop_worker()  # hold the job until the token has expired
    interaction = await running.imagine("a boat --steps 2")
    await fake.wait_for(lambda: interaction.responses, what="the defer")
    await fake.wait_for(lambda: await_queued(fake, interaction), what="the queued edit")
    fake.expire(interaction)
    await running.start_worker()
    message = await running.result(interaction)
    assert message["attachments"]
    channel_edits = fake.calls_to(
        "PATCH", f"/channels/{message['channel_id']}/messages/{message['id']}"
    )
    assert channel_edits and channel_edits[-1].files


def await_queued(fake: FakeDiscord, interaction: Interaction) -> bool:
    message = fake.original(interaction)
    return message is not None and "queued" in message["content"]


async def test_an_old_token_is_not_used_at_all(running: Harness) -> None:
    running.services.token_lifetime = timedelta(0)
    message = await running.result(await running.imagine("a boat --steps 2"))
    assert not running.fake.calls_to("PATCH", "/webhooks/")
    assert running.fake.calls_to("PATCH", f"/channels/{message['channel_id']}/messages/")


# -- /info /show /queue /cancel ---------------------------------------------------------------


async def test_queue_and_cancel(harness: Harness) -> None:
    await harness.start_bot()  # no worker: jobs wait
    fake = harness.fake
    first = await harness.imagine("a boat --steps 2")
    await fake.wait_for(lambda: await_queued(fake, first), what="queued")
    listing = await fake.slash("queue")
    await fake.wait_for(lambda: listing.responses, what="the queue")
    assert "queued #1" in listing.responses[0]["data"]["content"]

    [generation] = await harness.generations()
    others = await fake.slash("cancel", by=BOB, options={"generation": generation.id})
    await fake.wait_for(lambda: others.responses, what="a refusal")
    assert "someone else's" in others.responses[0]["data"]["content"]

    mine = await fake.slash("cancel")
    await fake.wait_for(lambda: mine.responses, what="the cancel")
    assert "cancelled" in mine.responses[0]["data"]["content"]
    await fake.wait_for(
        lambda: "cancelled" in (fake.original(first) or {}).get("content", ""), what="the edit"
    )
    async with harness.database.session() as session:
        assert (await get_generation(session, generation.id)).status is S.CANCELLED


async def test_a_moderator_cancels_only_jobs_of_their_own_server(harness: Harness) -> None:
    await harness.start_bot()  # no worker: jobs wait
    fake = harness.fake
    queued = await harness.imagine("a boat --steps 2")
    await fake.wait_for(lambda: await_queued(fake, queued), what="queued")
    [generation] = await harness.generations()

    elsewhere = await fake.slash(
        "cancel",
        by=MOD,
        permissions=MANAGE_MESSAGES,
        options={"generation": generation.id},
        guild_id=OTHER_GUILD_ID,
    )
    await fake.wait_for(lambda: elsewhere.responses, what="a refusal")
    assert "someone else's" in elsewhere.responses[0]["data"]["content"]
    [generation] = await harness.generations()
    assert generation.status is S.QUEUED

    here = await fake.slash(
        "cancel", by=MOD, permissions=MANAGE_MESSAGES, options={"generation": generation.id}
    )
    await fake.wait_for(lambda: here.responses, what="the cancel")
    assert "is cancelled" in here.responses[0]["data"]["content"]
    [generation] = await harness.generations()
    assert generation.status is S.CANCELLED


async def test_info_and_show(running: Harness) -> None:
    fake = running.fake
    await running.result(await running.imagine("a boat --steps 2 --seed 3"))
    [generation] = await running.generations()
    info = await fake.slash("info", options={"generation": generation.id})
    await fake.wait_for(lambda: info.responses, what="the info")
    assert "a boat --seed 3" in info.responses[0]["data"]["content"]
    missing = await fake.slash("info", options={"generation": 999})
    await fake.wait_for(lambda: missing.responses, what="the refusal")
    assert "no generation 999" in missing.responses[0]["data"]["content"]

    shown = await running.result(await fake.slash("show", options={"generation": generation.id}))
    assert len(fake.buttons(int(shown["id"]))) == 10
    u1 = await running.result(await running.press(shown, "U1"))
    assert u1["attachments"]


async def test_info_and_show_of_another_servers_generation_are_only_for_its_member(
    running: Harness,
) -> None:
    fake = running.fake
    await running.result(await running.imagine("a secret boat --steps 2 --seed 3"))
    [generation] = await running.generations()
    number = {"generation": generation.id}

    for command, where in (("info", OTHER_GUILD_ID), ("show", OTHER_GUILD_ID), ("info", None)):
        asked = await fake.slash(command, by=BOB, options=number, guild_id=where)
        sentence = await fake.wait_for(
            lambda asked=asked: fake.said_privately(asked), what="a refusal"
        )
        assert "made in another server" in sentence and "secret" not in sentence, sentence
    assert len(await running.generations()) == 1

    same_server = await fake.slash("info", by=BOB, options=number)
    await fake.wait_for(lambda: same_server.responses, what="the info")
    assert "a secret boat --seed 3" in same_server.responses[0]["data"]["content"]
    in_a_dm = await fake.slash("info", options=number, guild_id=None)
    await fake.wait_for(lambda: in_a_dm.responses, what="the info")
    assert "a secret boat --seed 3" in in_a_dm.responses[0]["data"]["content"]
    shown = await running.result(await fake.slash("show", options=number, guild_id=OTHER_GUILD_ID))
    assert len(fake.buttons(int(shown["id"]))) == 10
    # A moderator there may delete the message of one image, but not take the image out
    # of the gallery of the server it was made in.
    grid_id = int(shown["id"])
    u1 = fake.click(grid_id, fake.button(grid_id, "U1"), guild_id=OTHER_GUILD_ID)
    shown = await running.result(await u1)
    shown_id = int(shown["id"])
    await fake.click(
        shown_id,
        fake.button(shown_id, "Delete"),
        by=MOD,
        permissions=MANAGE_MESSAGES,
        guild_id=OTHER_GUILD_ID,
    )
    await fake.wait_for(lambda: shown_id in fake.deleted, what="the deletion")
    async with running.database.session() as session:
        removed = select(func.count()).select_from(Image).where(Image.removed_at.is_not(None))
        assert await session.scalar(removed) == 0


async def test_info_attaches_a_recipe_too_long_for_a_message(running: Harness) -> None:
    fake = running.fake
    prompt = ("a boat on a long calm sea at dawn, " * 40)[:1400].strip(" ,")
    negative = ", ".join(["blurry", "dark", "noisy"] * 30)
    await running.result(await running.imagine(f"{prompt} --steps 2 --seed 3", negative=negative))
    [generation] = await running.generations()
    info = await fake.slash("info", options={"generation": generation.id})
    await fake.wait_for(lambda: info.responses, what="the info")
    content = info.responses[0]["data"]["content"]
    assert f"attached as recipe-{generation.id}.txt" in content and len(content) <= 2000
    assert info.original_id is not None
    [recipe_text] = fake.attachment_bytes(info.original_id)
    # Whole, to its last flags: the text that reproduces the generation.
    assert recipe_text.decode() == format_recipe(generation.recipe)
    assert "--steps 2" in recipe_text.decode() and "dark, noisy" in recipe_text.decode()


async def test_every_image_row_points_at_a_stored_blob(running: Harness) -> None:
    await running.result(await running.imagine("a boat --steps 2"))
    async with running.database.session() as session:
        images = list(await session.scalars(select(Image)))
        assert await session.scalar(select(func.count()).select_from(Image)) == 4
    for image in images:
        assert await running.services.blobs.get(image.blob_key)
    [generation] = await running.generations()
    assert generation.grid_blob_key is not None
    assert await running.services.blobs.get(generation.grid_blob_key)


async def test_the_posted_grid_is_the_stored_grid(running: Harness) -> None:
    message = await running.result(await running.imagine("a boat --steps 2 --seed 4"))
    [posted] = running.fake.attachment_bytes(int(message["id"]))
    [generation] = await running.generations()
    assert generation.grid_blob_key is not None
    assert posted == await running.services.blobs.get(generation.grid_blob_key)


async def test_a_generation_stored_without_its_grid_is_shown_and_then_has_one(
    running: Harness,
) -> None:
    """Generations finished before the worker stored grids (migration 0009) have none."""
    await running.result(await running.imagine("a boat --steps 2 --seed 4"))
    [generation] = await running.generations()
    assert generation.grid_blob_key is not None
    made_by_the_worker = await running.services.blobs.get(generation.grid_blob_key)
    await running.services.blobs.delete(generation.grid_blob_key)
    async with running.database.session() as session:
        await session.execute(
            update(Generation).where(Generation.id == generation.id).values(grid_blob_key=None)
        )

    shown = await running.result(
        await running.fake.slash("show", options={"generation": generation.id})
    )
    [posted] = running.fake.attachment_bytes(int(shown["id"]))
    assert posted == made_by_the_worker  # composed from its tiles, as the worker does
    [generation] = await running.generations()
    assert generation.grid_blob_key is not None
    assert await running.services.blobs.get(generation.grid_blob_key) == posted


async def test_the_scaled_mode_delivers_over_listen_notify(
    tmp_path: Path, tiny_engine: Engine, request: pytest.FixtureRequest
) -> None:
    async with make_harness(tmp_path, tiny_engine, request, backend="postgresql") as scaled:
        await scaled.start_worker()
        await scaled.start_bot()
        grid = await scaled.result(await scaled.imagine("a boat --steps 4 --seed 9"))
        [tile] = scaled.fake.attachment_bytes(int(grid["id"]))
        assert read_recipe(tile).seed == 9
        contents = [h["content"] for h in grid["history"]]
        assert any("% (" in content for content in contents), contents
        previews = [h for h in grid["history"] if h["attachments"]]
        assert previews, "no preview crossed from the worker to the bot"
        single = await scaled.result(await scaled.press(grid, "U1"))
        upscaled = await scaled.result(await scaled.press(single, "Upscale 2×"))
        assert png_size(scaled.fake.attachment_bytes(int(upscaled["id"]))[0]) == (192, 192)
        generations = await scaled.generations()
        assert all(g.delivered_at is not None for g in generations)


async def test_zoom_out_and_pan_under_a_single_image_keep_its_pixels(running: Harness) -> None:
    fake = running.fake
    grid = await running.result(await running.imagine("a harbour --steps 2 --seed 5"))
    grid_id = int(grid["id"])
    single = await running.result(await fake.click(grid_id, fake.button(grid_id, "U1")))
    [tile] = fake.attachment_bytes(int(single["id"]))

    await running.stop_bot()  # the buttons work on messages posted before a restart
    await running.start_bot()
    zoomed = await running.result(await running.press(single, "🔭Zoom Out 2×"))
    assert len(fake.buttons(int(zoomed["id"]))) == 10  # a grid with the usual buttons
    panned = await running.result(await running.press(single, "➡️"))
    assert "pan right of image" in panned["content"]

    first, zoom_row, pan_row = await running.generations()
    source = np.asarray(PILImage.open(io.BytesIO(tile)).convert("RGB"))
    side = source.shape[0]
    for row, size in ((zoom_row, (2 * side, 2 * side)), (pan_row, (side * 3 // 2, side))):
        assert row.kind is GenerationKind.OUTPAINT and row.parent_image_id == first.images[0].id
        assert row.recipe.outpaint is not None and len(row.images) == 4
        assert (row.recipe.width, row.recipe.height) == size
        [image] = [i for i in row.images if i.index == 0]
        stored = await running.services.blobs.get(image.blob_key)
        pixels = np.asarray(PILImage.open(io.BytesIO(stored)).convert("RGB"))
        top, left = row.recipe.outpaint.top, row.recipe.outpaint.left
        assert np.array_equal(pixels[top : top + side, left : left + side], source)
    assert pan_row.recipe.outpaint is not None and pan_row.recipe.outpaint.left == 0
    assert pan_row.recipe.outpaint.right == side // 2  # the new half is on the right
