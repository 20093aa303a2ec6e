"""Styles from Discord: /style add with a real (tiny) LoRA upload, refusals, /styles, try it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from generation.engine import Engine
from generation.tiny import (
    build_tiny_flux,
    build_tiny_lora,
    build_tiny_sd,
    build_tiny_sd3,
    build_tiny_sdxl,
)
from storage.models import Style
from storage.style_store import StyleRefused, check_family, inspect_lora
from tests.fake_discord import BOB, MANAGE_GUILD, MOD
from tests.test_bot import Harness, harness, running

__all__ = ["harness", "running"]


async def add_style(
    running: Harness, filename: str, data: bytes, *, by: dict[str, Any] = MOD, **options: Any
) -> Any:
    value, resolved = running.fake.attachment_option(filename, data)
    return await running.fake.slash(
        "style",
        subcommand="add",
        options={"file": value, "name": "neon", "trigger_words": "neonish", **options},
        resolved=resolved,
        by=by,
        permissions=MANAGE_GUILD if by is MOD else 0,
    )


async def refusal(running: Harness, interaction: Any) -> str:
    said = lambda: running.fake.said_privately(interaction)  # noqa: E731
    text: str = await running.fake.wait_for(said, what="a refusal")
    return text


async def test_a_manager_adds_a_style_and_everyone_can_use_it(
    running: Harness, tiny_engine: Engine, tmp_path: Path
) -> None:
    fake = running.fake
    lora = build_tiny_lora(tiny_engine.pipe.unet, tmp_path / "neon.safetensors", seed=21)
    data = lora.read_bytes()
    # Braces and dashes of the description are not read as prompt syntax for the preview.
    described = "glowing tubes {soft — dreamy, --no"
    added = await add_style(running, "neon.safetensors", data, description=described)
    preview = await running.result(added)  # the fixed-seed preview, with its buttons
    assert preview["attachments"]
    said = await fake.wait_for(lambda: fake.said_privately(added), what="the confirmation")
    assert said.startswith("Style **neon** is added") and "preview is being made" in said
    async with running.database.session() as session:
        [style] = list(await session.scalars(select(Style)))
    assert style.lora_sha256 == hashlib.sha256(data).hexdigest()
    assert style.lora_rank == 4  # build_tiny_lora's rank: workers size their slots by it
    assert style.created_by == int(MOD["id"]) and style.preview_generation_id is not None
    assert await running.services.blobs.get(style.lora_blob_key or "") == data

    made = await running.result(await running.imagine("a city at night --steps 2", style="neon"))
    assert made["attachments"]
    *_, generation = await running.generations()
    assert [(s.name, s.sha256) for s in generation.recipe.styles] == [("neon", style.lora_sha256)]

    listing = await running.result(await fake.slash("styles"))
    assert "**neon** (server)" in listing["content"] and "neonish" in listing["content"]
    assert listing["attachments"], "the preview image is shown"
    click = await running.press(listing, "Try it")
    await fake.wait_for(lambda: click.responses, what="the modal")
    modal = click.responses[0]
    assert modal["type"] == 9
    tried = await fake.submit_modal(
        modal["data"]["custom_id"], {"prompt": "a fox --style neon --steps 2"}
    )
    await running.result(tried)
    *_, last = await running.generations()
    assert last.recipe.prompt == "a fox" and last.recipe.styles[0].name == "neon"

    # A preview that cannot be made (trigger words past the prompt's 1500 characters) does
    # not hide that the style is stored.
    many = ", ".join(f"word{number}" for number in range(200))
    long = await add_style(running, "long.safetensors", data, name="long", trigger_words=many)
    said = await fake.wait_for(lambda: fake.said_privately(long), what="the confirmation")
    assert said.startswith("Style **long** is added") and "preview could not be made" in said
    assert "1500" in said


async def test_a_server_style_shadows_a_folder_style_only_while_it_exists(
    running: Harness, tiny_engine: Engine, tmp_path: Path
) -> None:
    """A server's own style named like a folder style is used for that server's jobs; once
    removed, the folder's is used again (the worker's registry is shared by all servers)."""
    fake = running.fake
    lora = build_tiny_lora(tiny_engine.pipe.unet, tmp_path / "own.safetensors", seed=22)
    own = hashlib.sha256(lora.read_bytes()).hexdigest()
    folder = hashlib.sha256(tiny_engine.styles.get("style-01").lora_path.read_bytes()).hexdigest()
    added = await add_style(running, "own.safetensors", lora.read_bytes(), name="style-01")
    await running.result(added)  # its preview ran with the server's LoRA

    async def used() -> str | None:
        made = await running.imagine("a city at night --steps 2", style="style-01")
        await running.result(made)
        *_, generation = await running.generations()
        return generation.recipe.styles[0].sha256

    assert await used() == own
    removed = await fake.slash(
        "style", subcommand="remove", options={"name": "style-01"}, by=MOD, permissions=MANAGE_GUILD
    )
    await fake.wait_for(lambda: removed.responses, what="the removal")
    assert await used() == folder


async def test_uploads_that_cannot_be_styles_are_refused_and_nothing_is_kept(
    running: Harness, tmp_path: Path
) -> None:
    fake = running.fake
    pickle = await add_style(running, "neon.ckpt", b"\x80\x04not really")
    assert "not a .safetensors file" in await refusal(running, pickle)

    running.services.settings = running.services.settings.model_copy(update={"max_lora_mb": 1})
    big = await add_style(running, "big.safetensors", b"\0" * (2 * 2**20))
    assert "up to 1 MiB" in await refusal(running, big)
    assert fake.downloads == []  # both refused before downloading anything

    xl = build_tiny_lora(build_tiny_sdxl().unet, tmp_path / "xl.safetensors", seed=2)
    wrong = await add_style(running, "xl.safetensors", xl.read_bytes())
    assert "trained for tiny-sdxl" in await refusal(running, wrong)

    running.services.settings = running.services.settings.model_copy(
        update={"max_lora_mb": 256, "lora_max_rank": 4}
    )
    sd: Any = build_tiny_sd()
    wide = build_tiny_lora(sd.unet, tmp_path / "wide.safetensors", rank=8)
    too_wide = await add_style(running, "wide.safetensors", wide.read_bytes())
    assert (
        "wide.safetensors is a rank-8 LoRA; this bot takes styles up to rank 4 "
        "(IMAGINE_LORA_MAX_RANK)" in await refusal(running, too_wide)
    )

    garbage = await add_style(running, "junk.safetensors", b"\xff" * 64)
    assert "not a valid safetensors file" in await refusal(running, garbage)
    cut = await add_style(running, "cut.safetensors", wide.read_bytes()[:-100])
    assert "damaged or cut short" in await refusal(running, cut)
    loha = await add_style(running, "loha.safetensors", _loha(tmp_path / "loha.safetensors"))
    assert "loha.safetensors is a LyCORIS LoHa file, a format diffusers cannot load" in (
        await refusal(running, loha)
    )
    async with running.database.session() as session:
        assert list(await session.scalars(select(Style))) == []


def _loha(path: Path) -> bytes:
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    halves = {f"{name}.hada_w{i}_{h}": torch.zeros(4, 32) for i in (1, 2) for h in "ab"}
    save_file({**halves, f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path.read_bytes()


async def test_members_without_manage_server_cannot_add_styles(
    running: Harness, tiny_engine: Engine, tmp_path: Path
) -> None:
    lora = build_tiny_lora(tiny_engine.pipe.unet, tmp_path / "neon.safetensors", seed=21)
    refused = await add_style(running, "neon.safetensors", lora.read_bytes(), by=BOB)
    assert "Manage Server" in await refusal(running, refused)
    assert running.fake.downloads == []


def test_inspect_lora_reads_the_cross_attention_width(tiny_engine: Engine, tmp_path: Path) -> None:
    lora = build_tiny_lora(tiny_engine.pipe.unet, tmp_path / "a.safetensors", seed=1)
    info = inspect_lora(lora.read_bytes(), "a.safetensors", 2**30)
    assert info.cross_attention_width == 32 and info.tensors > 0


def _kohya_flux(path: Path, width: int) -> bytes:
    """A kohya-named FLUX LoRA header (zeros: only the layout and the shapes are read)."""
    from safetensors.torch import save_file

    name = "lora_unet_double_blocks_0_img_attn_qkv"
    layers = {f"{name}.lora_down.weight": torch.zeros(2, width)}
    save_file({**layers, f"{name}.lora_up.weight": torch.zeros(3 * width, 2)}, str(path))
    return path.read_bytes()


def test_sd3_and_flux_loras_are_checked_against_the_family(tmp_path: Path) -> None:
    sd3: Any = build_tiny_sd3()
    flux: Any = build_tiny_flux()
    sd: Any = build_tiny_sd()
    files = {
        "sd3": build_tiny_lora(sd3.transformer, tmp_path / "sd3.safetensors"),
        "flux": build_tiny_lora(flux.transformer, tmp_path / "flux.safetensors"),
        "sd": build_tiny_lora(sd.unet, tmp_path / "sd.safetensors"),
    }
    info = {kind: inspect_lora(path.read_bytes(), path.name, 2**30) for kind, path in files.items()}
    assert (info["sd3"].transformer, info["sd3"].transformer_width) == ("sd3", 32)
    assert (info["flux"].transformer, info["flux"].transformer_width) == ("flux", 32)
    assert info["sd"].transformer is None
    check_family(info["sd3"], "tiny-sd3", "sd3.safetensors")
    check_family(info["flux"], "tiny-flux", "flux.safetensors")
    refusals = [
        (info["flux"], "tiny-sd3", "flux.safetensors was trained for tiny-flux, but this bot runs"),
        (info["sd3"], "tiny-flux", "sd3.safetensors was trained for tiny-sd3, but this bot runs"),
        (info["sd"], "tiny-sd3", "sd.safetensors is a UNet (SD 1.5 / SD 2 / SDXL) LoRA, but"),
        (info["sd3"], "tiny-sd", "sd3.safetensors is a transformer LoRA for SD3 (MMDiT), but"),
    ]
    for lora, family, sentence in refusals:
        with pytest.raises(StyleRefused, match=re.escape(sentence)):
            check_family(lora, family, sentence.split()[0])
    real = inspect_lora(_kohya_flux(tmp_path / "k.safetensors", 3072), "k.safetensors", 2**30)
    assert (real.transformer, real.transformer_width) == ("flux", 3072)
    check_family(real, "flux", "k.safetensors")
    with pytest.raises(StyleRefused, match="trained for flux, but this bot runs a sd3 model"):
        check_family(real, "sd3", "k.safetensors")


async def test_an_sd3_lora_is_refused_on_an_sd_bot_and_nothing_is_kept(
    running: Harness, tmp_path: Path
) -> None:
    sd3: Any = build_tiny_sd3()
    lora = build_tiny_lora(sd3.transformer, tmp_path / "mmdit.safetensors")
    refused = await add_style(running, "mmdit.safetensors", lora.read_bytes())
    assert "mmdit.safetensors is a transformer LoRA for SD3 (MMDiT), but this bot runs" in (
        await refusal(running, refused)
    )
    async with running.database.session() as session:
        assert list(await session.scalars(select(Style))) == []


async def test_a_server_style_can_be_edited_and_removed(
    running: Harness, tiny_engine: Engine, tmp_path: Path
) -> None:
    fake = running.fake
    lora = build_tiny_lora(tiny_engine.pipe.unet, tmp_path / "neon.safetensors", seed=21)
    await running.result(await add_style(running, "neon.safetensors", lora.read_bytes()))
    edited = await fake.slash(
        "style",
        subcommand="edit",
        options={"name": "neon", "weight": 0.5, "trigger_words": "glow, tube"},
        by=MOD,
        permissions=MANAGE_GUILD,
    )
    assert "updated" in await refusal(running, edited)
    async with running.database.session() as session:
        [style] = list(await session.scalars(select(Style)))
    assert (style.default_weight, style.trigger_words) == (0.5, ["glow", "tube"])

    removed = await fake.slash(
        "style", subcommand="remove", options={"name": "neon"}, by=MOD, permissions=MANAGE_GUILD
    )
    assert "removed" in await refusal(running, removed)
    refused = await running.imagine("a city --steps 2", style="neon")
    assert "There is no style 'neon'" in await refusal(running, refused)


async def test_a_server_style_applies_at_its_own_default_weight(
    running: Harness, tiny_engine: Engine, tmp_path: Path
) -> None:
    """/style add's and /style edit's weight is the one every prompt naming the style gets
    (flag, option, preview), unless the prompt gives its own; after a restart too. A
    server style named like a folder style brings its own weight, not the folder's."""
    fake = running.fake
    lora = build_tiny_lora(tiny_engine.pipe.unet, tmp_path / "neon.safetensors", seed=21)
    await running.result(
        await add_style(running, "neon.safetensors", lora.read_bytes(), weight=0.5)
    )
    *_, preview = await running.generations()
    assert [s.weight for s in preview.recipe.styles] == [0.5]

    async def weight_of(prompt: str, **options: Any) -> float:
        await running.result(await running.imagine(f"{prompt} --steps 2", **options))
        *_, generation = await running.generations()
        [style] = generation.recipe.styles
        return style.weight

    assert await weight_of("a city --style neon") == 0.5
    assert await weight_of("a city", style="neon") == 0.5
    edited = await fake.slash(
        "style",
        subcommand="edit",
        options={"name": "neon", "weight": 0.7},
        by=MOD,
        permissions=MANAGE_GUILD,
    )
    assert "updated" in await refusal(running, edited)
    assert await weight_of("a city --style neon") == 0.7
    assert await weight_of("a city --style neon:0.9") == 0.9  # the prompt's own wins
    await running.stop_bot()
    await running.start_bot()
    assert await weight_of("a city --style neon") == 0.7

    shadow = build_tiny_lora(tiny_engine.pipe.unet, tmp_path / "own.safetensors", seed=22)
    added = await add_style(
        running, "own.safetensors", shadow.read_bytes(), name="style-01", weight=0.3
    )
    await running.result(added)
    assert await weight_of("a city --style style-01") == 0.3
