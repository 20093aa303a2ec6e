"""Running one generation job against a real database, blob store and tiny engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from generation.engine import CancelToken, Engine, Progress
from generation.jobs import run_generation
from generation.metadata import read_recipe
from storage.blobs import LocalBlobStore
from storage.database import Database
from storage.errors import IllegalTransition
from storage.generations import create_generation, get_generation
from storage.models import GenerationKind, GenerationStatus
from storage.recipe import Recipe

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
    outcome = await run_generation(
        database,
        blobs,
        tiny_engine,
        generation_id,
        worker_name="test-worker",
        progress=lambda p: steps.append(p.step),
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
