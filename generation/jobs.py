"""Running one generation job: claim it, run the engine, store images, record the outcome.

The images are stored as their own PNGs and, when there are several, as the one grid
posted to Discord: composed here once, so that readers only fetch it.

Used by the embedded worker, the ``imagine`` local commands and (later) the
scaled workers. The engine runs on a thread so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image as PILImage

from generation.controlnet import map_png
from generation.engine import (
    PNG_ENCODERS,
    TEST_FAULT_ENV,
    CancelToken,
    Engine,
    GeneratedImage,
    GenerationCancelled,
    Progress,
)
from generation.grid import compose_grid
from generation.metadata import encode_png
from generation.thumbnails import encode_thumbnails, stored_thumbnails
from storage.blobs import BlobStore
from storage.database import Database, is_outage
from storage.errors import ImagineError
from storage.generations import NewImage, transition
from storage.intake import fit_image, open_stored
from storage.models import Generation, GenerationKind, GenerationStatus
from storage.recipe import Recipe
from storage.results import record_success

log = logging.getLogger(__name__)

S = GenerationStatus
ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class JobOutcome:
    generation: Generation
    images: list[GeneratedImage]
    seconds: float


async def _source_image(database: Database, blobs: BlobStore, image_id: int) -> PILImage.Image:
    from storage.generations import get_image

    async with database.session() as session:
        image = await get_image(session, image_id)
    data = await blobs.get(image.blob_key)
    return PILImage.open(io.BytesIO(data)).convert("RGB")


async def image_prompt_source(blobs: BlobStore, recipe: Recipe) -> PILImage.Image:
    """An image prompt's stored pixels (hash checked), fitted to the generation's size."""
    ref = recipe.init_image
    assert ref is not None
    data = await blobs.get(ref.blob_key)
    image = await asyncio.to_thread(open_stored, data, ref)
    return await asyncio.to_thread(fit_image, image, recipe.width, recipe.height)


async def control_maps(
    blobs: BlobStore, engine: Engine, recipe: Recipe
) -> tuple[Recipe, list[PILImage.Image]]:
    """The maps of ``recipe``'s controls, and the recipe naming them.

    A control whose map is stored already (a reroll, a variation, a ``/show``) uses it as
    it is; otherwise the map is made from the source image by the control's preprocessor,
    stored, and its key and preprocessor written into the recipe.
    """
    controls, maps = [], []
    for ref in recipe.controls:
        if ref.map_key is not None:
            data = await blobs.get(ref.map_key)
            maps.append(PILImage.open(io.BytesIO(data)).convert("RGB"))
            controls.append(ref)
            continue
        assert ref.source_key is not None  # ControlRef needs one of the two
        source = PILImage.open(io.BytesIO(await blobs.get(ref.source_key)))
        made, image = await asyncio.to_thread(engine.control_map, ref, source, recipe)
        key = await blobs.put(await asyncio.to_thread(map_png, image))
        controls.append(made.model_copy(update={"map_key": key}))
        maps.append(image)
    return recipe.model_copy(update={"controls": tuple(controls)}), maps


async def materialize_styles(
    database: Database, blobs: BlobStore, engine: Engine, generation: Generation, folder: Path
) -> None:
    """Make the server's own styles (stored in the database) known to the engine.

    Their LoRA is written once to ``folder``, named by its hash; a database style
    shadows a folder style of the same name for its server's generations.
    """
    from generation.styles import StyleSpec
    from storage.style_store import find_style

    for ref in generation.recipe.styles:
        async with database.session() as session:
            style = await find_style(session, generation.guild_id, ref.name)
        if style is None or style.lora_blob_key is None or style.lora_sha256 is None:
            # A folder style, or unknown (the engine says which): never another server's
            # style of that name, nor one this server removed, put there by an earlier job.
            engine.styles.unshadow(ref.name)
            continue
        path = folder / f"{style.lora_sha256}.safetensors"
        if not await asyncio.to_thread(path.exists):
            await asyncio.to_thread(_write_atomically, path, await blobs.get(style.lora_blob_key))
        engine.styles.put(
            StyleSpec(
                name=style.name,
                description=style.description,
                lora_path=path,
                default_weight=style.default_weight,
                trigger_words=tuple(style.trigger_words),
                prompt_template=style.prompt_template,
                negative_template=style.negative_template,
                family=style.base_model_family,
                preview_path=None,
                source=path,
            )
        )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    except BaseException:  # a full disk: no half-written LoRA stays behind
        partial.unlink(missing_ok=True)
        raise


def _run_engine(
    engine: Engine,
    generation: Generation,
    recipe: Recipe,
    source: PILImage.Image | None,
    maps: list[PILImage.Image],
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
) -> list[GeneratedImage]:
    _injected_fault(recipe.prompt)
    if generation.kind is GenerationKind.UPSCALE:
        assert source is not None
        return [engine.upscale(recipe, source, progress=progress, cancel=cancel, encode=False)]
    if source is not None and recipe.outpaint is not None:
        return engine.outpaint(
            recipe, source, maps=maps, progress=progress, cancel=cancel, encode=False
        )
    if source is not None:
        return engine.img2img(
            recipe, source, maps=maps, progress=progress, cancel=cancel, encode=False
        )
    return engine.txt2img(recipe, maps=maps, progress=progress, cancel=cancel, encode=False)


def _injected_fault(prompt: str) -> None:
    """For the fault tests only (never set it elsewhere): ``IMAGINE_TEST_FAULT=crash:WORD``
    kills this process as a native crash in the engine would (SIGSEGV) when the prompt
    contains WORD; ``fail:WORD`` makes the engine call raise instead (and ``oom:``, the
    engine's own, makes it run out of memory)."""
    fault = os.environ.get(TEST_FAULT_ENV)
    if not fault:
        return
    kind, _, word = fault.partition(":")
    if not word or word not in prompt:
        return
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "fail":
        raise RuntimeError(f"{TEST_FAULT_ENV} failed this job on purpose")


async def run_generation(
    database: Database,
    blobs: BlobStore,
    engine: Engine,
    generation_id: int,
    *,
    worker_name: str,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> JobOutcome:
    """Claim a queued generation and run it to its end: succeeded, failed or cancelled.

    Raises :class:`~storage.errors.IllegalTransition` if the generation is not
    queued (another worker took it, or it was cancelled).
    """
    async with database.session() as session:
        generation = await transition(session, generation_id, S.RUNNING, worker_name=worker_name)
    return await execute_generation(
        database, blobs, engine, generation, progress=progress, cancel=cancel
    )


async def execute_generation(
    database: Database,
    blobs: BlobStore,
    engine: Engine,
    generation: Generation,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> JobOutcome:
    """Run a generation this worker has claimed (status running) and record the outcome."""
    generated = await generate(
        database, blobs, engine, generation, progress=progress, cancel=cancel
    )
    if isinstance(generated, JobOutcome):
        return generated
    return await finish_generation(database, blobs, generated)


@dataclass(frozen=True)
class Generated:
    """A job whose engine part is done: its images in memory, nothing stored yet."""

    generation: Generation
    images: list[GeneratedImage]
    recipe: Recipe  # completed by the engine
    grid_sampler: str  # AUTOMATIC1111's name of the sampler, for the grid's PNG
    started: float


async def generate(
    database: Database,
    blobs: BlobStore,
    engine: Engine,
    generation: Generation,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Generated | JobOutcome:
    """The engine's part of a claimed generation. A run that was cancelled or failed comes
    back as its recorded outcome; the rest is :func:`finish_generation`'s."""
    started = time.perf_counter()
    try:
        if generation.recipe.styles:
            await materialize_styles(database, blobs, engine, generation, engine.lora_folder)
        source = None
        if generation.recipe.source_image_id is not None:
            source = await _source_image(database, blobs, generation.recipe.source_image_id)
        elif generation.recipe.init_image is not None:
            source = await image_prompt_source(blobs, generation.recipe)
        recipe, maps = generation.recipe, list[PILImage.Image]()
        if recipe.controls and generation.kind is not GenerationKind.UPSCALE:
            recipe, maps = await control_maps(blobs, engine, recipe)
        images = await asyncio.to_thread(
            _run_engine, engine, generation, recipe, source, maps, progress, cancel
        )
        recipe = engine.complete_recipe(recipe)
        grid_sampler = engine.a1111_sampler(recipe.sampler)
    except Exception as exc:
        return await _ended(database, generation, exc, started)
    return Generated(generation, images, recipe, grid_sampler, started)


async def generate_batch(
    database: Database,
    blobs: BlobStore,
    engine: Engine,
    generations: list[Generation],
    *,
    progress: list[ProgressCallback | None],
    cancel: list[CancelToken],
    failures_allowed: int | None = None,
) -> list[Generated | JobOutcome]:
    """:func:`generate` for claimed text-to-image generations that share a
    :func:`~storage.scheduling.batch_key`, in one engine call. A cancelled one comes back
    recorded cancelled and the others go on; if the batch fails, each runs again alone,
    so a bad job fails alone. After ``failures_allowed`` of those fail (the worker stops
    claiming at that many), the rest go back to the queue unrun, for another worker."""
    if len(generations) == 1:
        one = await generate(
            database, blobs, engine, generations[0], progress=progress[0], cancel=cancel[0]
        )
        return [one]
    started = time.perf_counter()
    try:
        if generations[0].recipe.styles:  # one server, one style set: the key says so
            await materialize_styles(database, blobs, engine, generations[0], engine.lora_folder)
        per_job = await asyncio.to_thread(_run_batch, engine, generations, progress, cancel)
    except GenerationCancelled:
        per_job = [[] for _ in generations]  # every one was cancelled: recorded below
    except Exception as exc:
        if is_outage(exc):
            raise
        log.warning("a batch of %d failed (%s); its jobs run alone", len(generations), exc)
        alone: list[Generated | JobOutcome] = []
        failed = 0
        for generation, each, token in zip(generations, progress, cancel, strict=True):
            if failures_allowed is not None and failed >= failures_allowed:
                async with database.session() as session:
                    await transition(session, generation.id, S.QUEUED, owner=generation.worker_name)
                continue
            one = await generate(database, blobs, engine, generation, progress=each, cancel=token)
            if isinstance(one, JobOutcome) and one.generation.status is S.FAILED:
                failed += 1
            alone.append(one)
        return alone
    outcomes: list[Generated | JobOutcome] = []
    for generation, images, token in zip(generations, per_job, cancel, strict=True):
        if token.cancelled or not images:
            outcomes.append(await _ended(database, generation, GenerationCancelled(), started))
            continue
        recipe = engine.complete_recipe(generation.recipe)
        grid_sampler = engine.a1111_sampler(recipe.sampler)
        outcomes.append(Generated(generation, images, recipe, grid_sampler, started))
    return outcomes


def _run_batch(
    engine: Engine,
    generations: list[Generation],
    progress: list[ProgressCallback | None],
    cancel: list[CancelToken],
) -> list[list[GeneratedImage]]:
    for generation in generations:
        _injected_fault(generation.recipe.prompt)
    recipes = [generation.recipe for generation in generations]
    return engine.txt2img_batch(recipes, progress=progress, cancel=cancel, encode=False)


async def finish_generation(
    database: Database, blobs: BlobStore, generated: Generated
) -> JobOutcome:
    """Encode, store and record what :func:`generate` made. It needs no engine: a worker
    runs it on CPU threads while the engine runs the next job."""
    images, recipe = generated.images, generated.recipe
    generation_id = generated.generation.id
    try:
        loop = asyncio.get_running_loop()
        pngs = [
            loop.run_in_executor(PNG_ENCODERS, encode_png, one.image, one.recipe, one.sampler)
            for one in images
            if not one.png
        ]
        grid: asyncio.Future[bytes] | None = None
        if len(images) > 1:  # one image (an upscale) is shown as it is: no grid
            grid = loop.run_in_executor(
                PNG_ENCODERS, compose_grid, images, recipe, generated.grid_sampler
            )
        encoded = await asyncio.gather(
            *(loop.run_in_executor(PNG_ENCODERS, encode_thumbnails, one.image) for one in images)
        )
        fresh = iter(await asyncio.gather(*pngs))
        images = [one if one.png else replace(one, png=next(fresh)) for one in images]
        grid_png = None if grid is None else await grid
        # Every blob of the job in one write (one transaction for a database store), before
        # the rows that refer to them: the PNGs, the thumbnails, then the grid.
        thumbnail_blobs = [data for per_image in encoded for *_, data in per_image]
        stored = await blobs.put_many(
            [image.png for image in images]
            + thumbnail_blobs
            + ([] if grid_png is None else [grid_png])
        )
        keys = stored[: len(images)]
        grid_key = None if grid_png is None else stored[-1]
        thumbnail_keys = iter(stored[len(images) : len(images) + len(thumbnail_blobs)])
        made = [
            stored_thumbnails(per_image, [next(thumbnail_keys) for _ in per_image])
            for per_image in encoded
        ]
    except Exception as exc:
        return await _ended(database, generated.generation, exc, generated.started)

    generation = await record_success(
        database,
        generation_id,
        [
            NewImage(
                index=image.index,
                seed=image.seed,
                width=image.width,
                height=image.height,
                blob_key=key,
                sha256=key,
            )
            for image, key in zip(images, keys, strict=True)
        ],
        made,
        grid_key,
        recipe,
        owner=generated.generation.worker_name,
    )
    return JobOutcome(generation, images, time.perf_counter() - generated.started)


async def _ended(
    database: Database, claimed: Generation, exc: Exception, started: float
) -> JobOutcome:
    """Record how a job ended early: cancelled, or failed with a sentence."""
    generation_id, owner = claimed.id, claimed.worker_name
    if isinstance(exc, GenerationCancelled):
        async with database.session() as session:
            generation = await transition(session, generation_id, S.CANCELLED, owner=owner)
        return JobOutcome(generation, [], time.perf_counter() - started)
    if is_outage(exc):
        raise exc  # not the job's fault: the worker runs it again once the database is back
    message = str(exc) if isinstance(exc, ImagineError) else f"{type(exc).__name__}: {exc}"
    log.error("generation %s failed", generation_id, exc_info=exc)
    async with database.session() as session:
        generation = await transition(session, generation_id, S.FAILED, error=message, owner=owner)
    return JobOutcome(generation, [], time.perf_counter() - started)
