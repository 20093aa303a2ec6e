"""Rough edges of the bot: crafted button ids, refused members, refused style uploads."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.replies import FAULT
from generation.engine import Engine
from generation.tiny import build_tiny_lora
from storage.errors import QueueUnavailable
from storage.models import Style
from storage.style_store import add_style as store_style
from tests.fake_discord import ALICE, BOB, GUILD_ID, MANAGE_GUILD, MOD
from tests.test_bot import Harness, harness

__all__ = ["harness"]

HUGE = "99999999999999999999"  # 20 digits: past any 64-bit key


@pytest.fixture
async def bot_only(harness: Harness) -> Harness:
    await harness.start_bot()  # no worker: nothing here needs one
    return harness


async def said(harness: Harness, interaction: Any) -> str:
    text: str = await harness.fake.wait_for(
        lambda: harness.fake.said_privately(interaction), what="an ephemeral sentence"
    )
    return text


async def click(harness: Harness, custom_id: str, posted: dict[str, Any] | None = None) -> Any:
    """A click on a button with this ``custom_id``, on a message the bot posted (a
    ``/gallery`` page unless ``posted`` is given)."""
    fake = harness.fake
    if posted is None:
        posted = await harness.result(await fake.slash("gallery", options={"sort": "new"}))
    button = {"type": 2, "style": 2, "label": "crafted", "custom_id": custom_id}
    message = {**posted, "components": [{"type": 1, "components": [button]}]}
    data = {"custom_id": custom_id, "component_type": 2}
    return await fake.interact(3, data, by=ALICE, message=message)


@pytest.mark.parametrize(
    ("custom_id", "sentence"),
    [
        (f"gen:{HUGE}:v2", f"There is no generation {HUGE}"),
        (f"gen:{HUGE}:remix", f"There is no generation {HUGE}"),
        ("gen:4242:u1", "There is no generation 4242"),
        (f"img:{HUGE}:info", f"There is no image {HUGE}"),
        (f"img:{HUGE}:like", f"There is no image {HUGE}"),
        (f"gim:{HUGE}:like", f"There is no image {HUGE}"),
        (f"gim:{HUGE}:open", f"There is no image {HUGE}"),
    ],
)
async def test_a_button_naming_no_record_gets_a_sentence(
    bot_only: Harness, custom_id: str, sentence: str
) -> None:
    answered = await click(bot_only, custom_id)
    assert sentence in await said(bot_only, answered)
    assert await bot_only.generations() == []


async def test_a_remix_of_a_generation_past_any_id_gets_a_sentence(bot_only: Harness) -> None:
    submitted = await bot_only.fake.submit_modal(f"remix:{HUGE}", {"prompt": "a boat"})
    assert f"There is no generation {HUGE}" in await said(bot_only, submitted)
    assert await bot_only.generations() == []


async def test_a_refused_member_is_told_why_and_logged_in_one_info_line(
    bot_only: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = bot_only.fake
    policy = await fake.slash("policy", subcommand="ban", options={"words": "boat"}, by=BOB)
    assert "Manage Server" in await said(bot_only, policy)
    style = await fake.slash("style", subcommand="remove", options={"name": "neon"}, by=BOB)
    assert "Manage Server" in await said(bot_only, style)

    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [(r.levelno, r.exc_info) for r in refused] == [(logging.INFO, None)] * 2
    assert "/policy ban" in refused[0].getMessage() and BOB["id"] in refused[0].getMessage()


def blob_files(harness: Harness) -> list[Path]:
    folder = harness.services.settings.data_dir / "blobs"
    return sorted(path for path in folder.rglob("*") if path.is_file())


async def upload(harness: Harness, data: bytes, name: str) -> Any:
    value, resolved = harness.fake.attachment_option("neon.safetensors", data)
    return await harness.fake.slash(
        "style",
        subcommand="add",
        options={"file": value, "name": name},
        resolved=resolved,
        by=MOD,
        permissions=MANAGE_GUILD,
    )


async def test_a_refused_style_name_keeps_no_upload(
    bot_only: Harness, tiny_engine: Engine, tmp_path: Path
) -> None:
    async with bot_only.database.session() as session:
        await store_style(
            session,
            guild_id=GUILD_ID,
            name="neon",
            family=tiny_engine.family.name,
            lora_blob_key="kept-elsewhere",
            lora_sha256="0" * 64,
            lora_rank=4,
            created_by=int(MOD["id"]),
        )
    lora = build_tiny_lora(tiny_engine.pipe.unet, tmp_path / "neon.safetensors", seed=21)
    before = blob_files(bot_only)

    taken = await upload(bot_only, lora.read_bytes(), "neon")
    assert "already has a style named neon" in await said(bot_only, taken)
    malformed = await upload(bot_only, lora.read_bytes(), "neon lights")
    assert "must be 1 to 64 letters" in await said(bot_only, malformed)

    assert blob_files(bot_only) == before
    assert bot_only.fake.downloads == []  # refused before the upload was even fetched
    async with bot_only.database.session() as session:
        assert [s.name for s in await session.scalars(select(Style))] == ["neon"]


async def test_a_database_that_cannot_answer_or_a_fault_gets_a_sentence_not_silence(
    bot_only: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under a button, a slash command or a form: the queue's sentence while the database
    is away, a logged fault's sentence for a bug, and everything works again after."""
    fake = bot_only.fake
    posted = await bot_only.result(await fake.slash("gallery", options={"sort": "new"}))
    engine = bot_only.services.database.engine
    dialect = engine.sync_engine.dialect
    connect = dialect.connect

    async def fail_with(error: Callable[[], Exception]) -> None:
        def failing(*args: Any, **kwargs: Any) -> Any:
            raise error()

        await engine.dispose()  # no pooled connection survives: each query connects anew
        monkeypatch.setattr(dialect, "connect", failing)

    async def answers() -> list[str]:
        return [
            await said(bot_only, interaction)
            for interaction in [
                await click(bot_only, "img:1:like", posted),
                await click(bot_only, "gen:1:v1", posted),
                await click(bot_only, "gim:1:open", posted),
                await fake.slash("info", options={"generation": 1}),
                await fake.submit_modal("remix:1", {"prompt": "a boat"}),
            ]
        ]

    # As asyncpg says it when PostgreSQL is down.
    await fail_with(lambda: ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"))
    assert await answers() == [QueueUnavailable.MESSAGE] * 5

    caplog.set_level(logging.ERROR, logger="bot.replies")
    await fail_with(lambda: RuntimeError("a bug"))
    said_for_faults = await answers()
    whats = ["the like button", "the V1 button", "the gallery's open button", "/info"]
    assert said_for_faults == [FAULT.format(what=what) for what in [*whats, "the Remix form"]]
    logged = [record for record in caplog.records if record.exc_info is not None]
    assert len(logged) == 5
    assert all(str(record.exc_info[1]) == "a bug" for record in logged if record.exc_info)

    monkeypatch.setattr(dialect, "connect", connect)
    assert "There is no generation 1" in await said(
        bot_only, await fake.slash("info", options={"generation": 1})
    )


async def test_a_repeat_cut_short_by_the_queue_limit_leaves_no_placeholder(
    bot_only: Harness,
) -> None:
    fake = bot_only.fake
    await bot_only.imagine("a cat --steps 2")  # no worker: everything stays queued
    await fake.wait_for(lambda: len(fake.messages) >= 1, what="the first")
    repeated = await bot_only.imagine("a boat --steps 2 --repeat 10")  # the limit is 10
    assert "the most allowed here is 10" in await said(bot_only, repeated)
    assert len(await bot_only.generations()) == 10
    assert [m for m in fake.messages.values() if m["content"] == "⏳"] == []
