"""A compiled worker's style slots are as large as the installed styles need: sized at start
from the styles folder's and the database's LoRAs, read from their headers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from generation.engine import Engine
from generation.lora import LoraSlots
from generation.styles import StyleRegistry
from generation.tiny import build_tiny_lora, build_tiny_sd
from storage.blobs import LocalBlobStore
from storage.database import Database
from storage.models import Style
from storage.settings import Settings
from storage.slot_rank import size_slots, stored_style_rank
from storage.style_store import add_style, inspect_lora, lora_rank_of
from tests.test_styles import write_style


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A tiny SD LoRA of each rank, by rank."""
    folder = tmp_path_factory.mktemp("ranked-loras")
    pipe: Any = build_tiny_sd()
    unet = pipe.unet
    return {
        rank: build_tiny_lora(unet, folder / f"rank{rank}.safetensors", seed=rank, rank=rank)
        for rank in (4, 16, 32)
    }


def styles_folder(folder: Path, loras: dict[int, Path], ranks: list[int]) -> Path:
    folder.mkdir()
    for rank in ranks:
        (folder / f"rank{rank}.safetensors").write_bytes(loras[rank].read_bytes())
        write_style(folder, f"rank{rank}", f"rank{rank}.safetensors")
    return folder


def test_auto_picks_the_smallest_power_of_two_that_holds_the_largest_style(
    loras: dict[int, Path], tmp_path: Path
) -> None:
    registry = StyleRegistry.from_folder(styles_folder(tmp_path / "styles", loras, [4, 16]))
    assert sorted(registry.lora_ranks()) == [4, 16]
    assert size_slots(None, registry.lora_ranks(), 64).rank == 16
    assert size_slots(None, [4], 64).rank == 8  # never below 8
    assert size_slots(None, [17], 64).rank == 32
    empty = size_slots(None, StyleRegistry.from_folder(tmp_path / "none").lora_ranks(), 64)
    assert (empty.rank, empty.largest) == (8, 0)
    assert empty.describe() == "style slots of rank 8: no style is installed"
    capped = size_slots(None, [4, 32], 16)
    assert capped.rank == 16
    assert "above IMAGINE_LORA_MAX_RANK (16)" in capped.describe()
    assert size_slots(None, [4], 4).rank == 4  # a max rank below 8 caps it too
    fixed = size_slots(12, [4, 16], 64)
    assert (fixed.rank, fixed.fixed) == (12, True)


def test_ranks_come_from_the_header_alone(loras: dict[int, Path], tmp_path: Path) -> None:
    data = loras[16].read_bytes()
    assert lora_rank_of(loras[16]) == lora_rank_of(data) == 16
    assert inspect_lora(data, "r.safetensors", 2**30).rank == 16
    # The header is all it reads: a file cut short in its weights still tells its rank.
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    assert lora_rank_of(cut) == 16
    cut.write_bytes(data[:20])  # cut inside the header
    assert lora_rank_of(cut) is None
    assert lora_rank_of(b"\xff" * 64) is None
    assert lora_rank_of(tmp_path / "missing.safetensors") is None


async def test_a_stored_style_has_its_rank_recorded_and_old_rows_are_filled_in_once(
    database: Database, loras: dict[int, Path], tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    keys = {rank: await blobs.put(path.read_bytes()) for rank, path in loras.items()}
    async with database.session() as session:
        assert await stored_style_rank(session, blobs) == 0  # no stored style
        for guild, rank in ((1, 4), (2, 16), (3, 32)):
            info = inspect_lora(loras[rank].read_bytes(), "l.safetensors", 2**30)
            await add_style(
                session,
                guild_id=guild,
                name=f"rank{rank}",
                family="tiny-sd",
                lora_blob_key=keys[rank],
                lora_sha256="0" * 64,
                lora_rank=info.rank,
                created_by=7,
            )
    async with database.session() as session:
        rows = {s.name: s for s in await session.scalars(select(Style))}
        assert {name: row.lora_rank for name, row in rows.items()} == {
            "rank4": 4,
            "rank16": 16,
            "rank32": 32,
        }
        rows["rank32"].enabled = False  # a removed style sizes nothing
        rows["rank16"].lora_rank = None  # as a row added before ranks were recorded
    async with database.session() as session:
        assert await stored_style_rank(session, blobs) == 16  # from the blob's header
    async with database.session() as session:
        assert await session.scalar(select(Style.lora_rank).where(Style.guild_id == 2)) == 16
    await blobs.delete(keys[16])  # the next start reads the column alone
    async with database.session() as session:
        assert await stored_style_rank(session, blobs) == 16


def test_a_compiled_engine_sizes_its_slots_from_the_folder_and_the_database(
    loras: dict[int, Path], tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        model="tiny",
        device="cpu",
        styles_dir=styles_folder(tmp_path / "styles", loras, [4, 16]),
        compile="on",
        lora_max_rank=64,
    )
    # Built, not run: nothing compiles until a first denoising step.
    engine = Engine.from_settings(settings)
    assert isinstance(engine.loras, LoraSlots)
    assert (engine.loras.rank, engine.loras.sizing.largest) == (16, 16)
    # The slots' layers really are of that rank (what every styled step pays for).
    widths = {
        layer.lora_A[name].weight.shape[0]
        for layer in engine.loras._layers
        for name in engine.loras.names
    }
    assert widths == {16}
    stored = Engine.from_settings(settings, stored_style_rank=32)
    assert isinstance(stored.loras, LoraSlots) and stored.loras.rank == 32
    fixed = Engine.from_settings(settings.model_copy(update={"lora_slot_rank": "8"}))
    assert isinstance(fixed.loras, LoraSlots) and fixed.loras.rank == 8
