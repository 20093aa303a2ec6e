"""Running one generation job against a real database, blob store and tiny engine."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from generation.engine import CancelToken, Engine, Progress
from generation.grid import compose_grid, compose_grid_image
from generation.jobs import run_generation
from generation.metadata import read_recipe
from storage.blobs import LocalBlobStore
from storage.database import Database
from storage.errors import IllegalTransition
from storage.generations import create_generation, get_generation
from storage.models import GenerationKind, GenerationStatus, Thumbnail
from storage.recipe import Recipe
from storage.thumbnails import THUMBNAIL_SIZES

S = GenerationStatus


def recipe(**changes: object) -> Recipe:
    values: dict[str, object] = {
        "model": "tiny",
        "prompt": "a harbour at night",
        "seed": 11,
        "width": 64,
        "height": 64,
        "steps": 3,
        "guidance": 5.0,
    }
    values.update(changes)
    return Recipe.model_validate(values)


async def submit(database: Database, kind: GenerationKind, r: Recipe) -> int:
    async with database.session() as session:
        generation = await create_generation(session, kind=kind, recipe=r, requester_id=1)
        return generation.id


async def test_a_job_stores_its_images_and_completes_the_recipe(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    generation_id = await submit(database, GenerationKind.IMAGINE, recipe())
    steps: list[int] = []

    def on_progress(progress: Progress) -> None:
        if progress.preview is None:  # a preview comes later, from its own thread
            steps.append(progress.step)

    outcome = await run_generation(
        database,
        blobs,
        tiny_engine,
        generation_id,
        worker_name="test-worker",
        progress=on_progress,
    )
    assert outcome.generation.status is S.SUCCEEDED
    assert steps == [1, 2, 3]
    async with database.session() as session:
        stored = await get_generation(session, generation_id)
    assert stored.worker_name == "test-worker" and stored.attempts == 1
    assert stored.recipe.model_hash == tiny_engine.model_hash
    assert [image.seed for image in stored.images] == [11, 12, 13, 14]
    for image in stored.images:
        png = await blobs.get(image.blob_key)
        assert read_recipe(png).seed == image.seed
    # The web gallery's thumbnails were made beside the PNGs, one of each size per image.
    thumbnails = await stored_thumbnails(database)
    assert sorted((t.image_id, t.size) for t in thumbnails) == sorted(
        (image.id, size) for image in stored.images for size in THUMBNAIL_SIZES
    )
    for thumbnail in thumbnails:
        with Image.open(io.BytesIO(await blobs.get(thumbnail.blob_key))) as webp:
            assert webp.format == "WEBP" and webp.size == (thumbnail.width, thumbnail.height)
            assert webp.size == (64, 64)  # never larger than the image

    # A variation of image 2 reads its source back from the blob store.
    source = stored.images[2]
    variation = recipe(seed=99, strength=0.35, source_image_id=source.id)
    variation_id = await submit(database, GenerationKind.VARIATION, variation)
    varied = await run_generation(database, blobs, tiny_engine, variation_id, worker_name="w")
    assert varied.generation.status is S.SUCCEEDED and len(varied.images) == 4

    upscale = recipe(count=1, scale=2, source_image_id=source.id, width=128, height=128)
    upscale_id = await submit(database, GenerationKind.UPSCALE, upscale)
    upscaled = await run_generation(database, blobs, tiny_engine, upscale_id, worker_name="w")
    assert upscaled.images[0].image.size == (128, 128)


def stored_files(blobs: LocalBlobStore) -> set[str]:
    return {path.name for path in blobs.root.rglob("*") if path.is_file()}


async def stored_thumbnails(database: Database) -> list[Thumbnail]:
    async with database.session() as session:
        return list(await session.scalars(select(Thumbnail)))


async def test_the_worker_stores_one_grid_composed_of_its_tiles(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    generation_id = await submit(database, GenerationKind.IMAGINE, recipe(width=96, height=64))
    outcome = await run_generation(database, blobs, tiny_engine, generation_id, worker_name="w")
    async with database.session() as session:
        stored = await get_generation(session, generation_id)
    assert outcome.generation.grid_blob_key == stored.grid_blob_key is not None
    tile_keys = {image.blob_key for image in stored.images}
    assert len(tile_keys) == 4
    thumbnail_keys = {t.blob_key for t in await stored_thumbnails(database)}
    assert len(thumbnail_keys) == 4  # 96×64 is under both sizes: the same WebP, stored once
    # Exactly one grid (and the web gallery's thumbnails).
    assert stored_files(blobs) == tile_keys | {stored.grid_blob_key} | thumbnail_keys

    grid = await blobs.get(stored.grid_blob_key)
    tiles = [Image.open(io.BytesIO(await blobs.get(image.blob_key))) for image in stored.images]
    with Image.open(io.BytesIO(grid)) as image:
        assert image.size == (192, 128)
        assert np.array_equal(np.asarray(image), np.asarray(compose_grid_image(tiles)))
    assert read_recipe(grid) == stored.recipe  # the generation's recipe, completed
    assert grid == compose_grid(outcome.images, stored.recipe)

    # One image (an upscale) is shown as it is: no grid.
    before = stored_files(blobs)
    upscale = recipe(count=1, scale=2, source_image_id=stored.images[0].id, width=192, height=128)
    upscale_id = await submit(database, GenerationKind.UPSCALE, upscale)
    upscaled = await run_generation(database, blobs, tiny_engine, upscale_id, worker_name="w")
    assert upscaled.generation.status is S.SUCCEEDED
    assert upscaled.generation.grid_blob_key is None
    [image] = upscaled.generation.images
    thumbnail_keys = {t.blob_key for t in await stored_thumbnails(database)} - thumbnail_keys
    assert stored_files(blobs) - before == {image.blob_key} | thumbnail_keys


async def test_a_cancelled_job_is_recorded_as_cancelled(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    token = CancelToken()

    def cancel_at_two(progress: Progress) -> None:
        if progress.step == 2:
            token.cancel()

    generation_id = await submit(database, GenerationKind.IMAGINE, recipe(steps=6))
    outcome = await run_generation(
        database,
        LocalBlobStore(tmp_path),
        tiny_engine,
        generation_id,
        worker_name="w",
        progress=cancel_at_two,
        cancel=token,
    )
    assert outcome.generation.status is S.CANCELLED and outcome.images == []
    async with database.session() as session:
        assert (await get_generation(session, generation_id)).images == []


async def test_a_failing_job_keeps_its_error(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    generation_id = await submit(database, GenerationKind.IMAGINE, recipe(sampler="warp"))
    outcome = await run_generation(
        database, LocalBlobStore(tmp_path), tiny_engine, generation_id, worker_name="w"
    )
    assert outcome.generation.status is S.FAILED
    assert outcome.generation.error is not None and "Unknown sampler" in outcome.generation.error


async def test_a_job_runs_at_most_once(
    database: Database, tiny_engine: Engine, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path)
    generation_id = await submit(database, GenerationKind.IMAGINE, recipe(count=1))
    await run_generation(database, blobs, tiny_engine, generation_id, worker_name="w")
    with pytest.raises(IllegalTransition):
        await run_generation(database, blobs, tiny_engine, generation_id, worker_name="w")
