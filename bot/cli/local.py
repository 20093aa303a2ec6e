"""Local commands that run the whole path without Discord, in embedded mode.

``imagine generate | upscale | vary | reroll | show | styles``. The engine is
imported only when a command needs it, so ``imagine show`` stays quick.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import io
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.cli.engine import load_engine, stored_style_rank
from bot.deployment import start_deployment
from storage.blobs import LocalBlobStore
from storage.deployment import Deployment
from storage.derive import (
    PAN_DIRECTIONS,
    ZOOM_FACTORS,
    family_of,
    outpaint_recipe,
    pan_margins,
    reroll_recipe,
    upscale_recipe,
    variation_recipe,
    zoom_margins,
)
from storage.errors import ImagineError
from storage.families import ModelFamily, configured_family
from storage.generations import create_generation, get_generation, get_image, transition
from storage.models import Generation, GenerationKind, GenerationStatus, Image
from storage.recipe import Outpaint, Recipe
from storage.scheduling import forget_worker, heartbeat
from storage.settings import Settings, load_settings

if TYPE_CHECKING:
    from generation.engine import CancelToken, Engine, Progress

LOCAL_USER_ID = 0  # the requester of generations made from the command line
OUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

log = logging.getLogger(__name__)


def register(commands: Any) -> None:
    generate = _running_command(
        commands, "generate", "generate a grid from a prompt with --flags, without Discord"
    )
    generate.add_argument("prompt", help='e.g. "a red bicycle on a beach --ar 3:2 --seed 42"')
    generate.add_argument(
        "--no-wait",
        action="store_true",
        help="only queue it (a running bot or `imagine worker` runs it); print its id",
    )
    generate.set_defaults(handler=_generate)

    upscale = _running_command(commands, "upscale", "upscale one image 2x")
    upscale.add_argument("image_id", type=int)
    upscale.set_defaults(handler=_upscale)

    vary = _running_command(commands, "vary", "four variations of one image")
    vary.add_argument("image_id", type=int)
    strength = vary.add_mutually_exclusive_group()
    strength.add_argument("--subtle", dest="strong", action="store_false", default=False)
    strength.add_argument("--strong", dest="strong", action="store_true")
    vary.set_defaults(handler=_vary)

    zoom = _running_command(commands, "zoom", "zoom out: four wider views around one image")
    zoom.add_argument("image_id", type=int)
    zoom.add_argument("--factor", type=float, choices=ZOOM_FACTORS, default=2.0)
    zoom.set_defaults(handler=_zoom)

    pan = _running_command(commands, "pan", "extend one image by half a side in a direction")
    pan.add_argument("image_id", type=int)
    pan.add_argument("direction", choices=PAN_DIRECTIONS)
    pan.set_defaults(handler=_pan)

    reroll = _running_command(commands, "reroll", "run a generation's recipe with a new seed")
    reroll.add_argument("generation_id", type=int)
    reroll.set_defaults(handler=_reroll)

    show = commands.add_parser("show", help="show a generation's recipe, status and images")
    show.add_argument("generation_id", type=int)
    show.set_defaults(handler=_show)

    styles = commands.add_parser("styles", help="list the styles in the styles folder")
    styles.set_defaults(handler=_styles)


def _running_command(commands: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A sub-command that runs the engine: it takes --model and --out."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help)
    parser.add_argument(
        "--model", help="model to use instead of IMAGINE_MODEL ('tiny' runs offline on a CPU)"
    )
    parser.add_argument("--out", type=Path, help="write the image here (default: data folder)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    model = getattr(args, "model", None)
    return load_settings(model=model) if model else load_settings()


class ProgressBar:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, width: int = 30) -> None:
        self.label = label
        self.width = width
        self.tty = sys.stderr.isatty()

    def __call__(self, progress: Progress) -> None:
        done = int(self.width * progress.step / max(progress.total, 1))
        bar = "#" * done + "-" * (self.width - done)
        line = f"{self.label} [{bar}] {progress.step}/{progress.total}"
        if self.tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif progress.step == progress.total:
            print(line, file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that could not be written, before any model loads or row exists."""
    if out.is_dir():
        raise ImagineError(
            f"--out {out} is a folder; give a file name in it, such as {out / 'image.png'}."
        )
    if out.suffix.lower() not in OUT_FORMATS:
        raise ImagineError(
            f"--out {out} does not end in an image suffix Imagine writes; "
            f"use {', '.join(OUT_FORMATS)}."
        )
    above = next((folder for folder in out.absolute().parents if folder.exists()), None)
    if above is not None and not above.is_dir():
        raise ImagineError(f"--out {out} cannot be written: {above} is a file, not a folder.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
        if out.exists() and not out.is_file():
            raise IsADirectoryError(f"{out} is not a regular file")
        if out.exists() and not os.access(out, os.W_OK):
            raise PermissionError(errno.EACCES, "the file is read-only")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ImagineError(
            f"--out {out} cannot be written ({reason}); choose a place you may write to."
        ) from None


def encode_for(out: Path, png: bytes) -> bytes:
    """The image in the format ``out``'s suffix names; a PNG keeps its recipe chunks."""
    from PIL import Image as PILImage

    image_format = OUT_FORMATS[out.suffix.lower()]
    if image_format == "PNG":
        return png
    with PILImage.open(io.BytesIO(png)) as image:
        parameters = image.info.get("parameters")
        converted = image.convert("RGB") if image_format == "JPEG" else image.copy()
    exif = PILImage.Exif()
    if parameters:
        # A1111 keeps the parameters of a JPEG or WebP in the EXIF UserComment.
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + parameters.encode("utf-16-be")
    buffer = io.BytesIO()
    converted.save(buffer, format=image_format, quality=95, exif=exif)
    return buffer.getvalue()


async def _run(
    deployment: Deployment,
    engine: Engine,
    generation: Generation,
    out: Path | None,
    cancel: CancelToken | None = None,
) -> Path:
    from generation.jobs import execute_generation

    bar = ProgressBar(f"generation {generation.id}")
    outcome = await execute_generation(
        deployment.database, deployment.blobs, engine, generation, progress=bar, cancel=cancel
    )
    bar.finish()
    if outcome.generation.status is GenerationStatus.CANCELLED and cancel and cancel.cancelled:
        from bot.cli import Interrupted

        raise Interrupted(f"interrupted; generation {generation.id} is cancelled.")
    if outcome.generation.status is not GenerationStatus.SUCCEEDED:
        raise ImagineError(
            f"Generation {generation.id} {outcome.generation.status.value}: "
            f"{outcome.generation.error or 'no reason recorded'}"
        )
    if out is None:
        out = deployment.settings.data_dir / "outputs" / f"generation-{generation.id}.png"
    if len(outcome.images) == 1:
        png = outcome.images[0].png
    else:
        assert outcome.generation.grid_blob_key is not None  # the worker stores every grid
        png = await deployment.blobs.get(outcome.generation.grid_blob_key)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(encode_for(out, png))
    except OSError as exc:
        raise ImagineError(
            f"Generation {generation.id} succeeded but {out} could not be written "
            f"({exc.strerror or exc}); its images are kept, see `imagine show {generation.id}`."
        ) from None
    print(
        f"generation {generation.id}: {len(outcome.images)} image(s) in "
        f"{outcome.seconds:.2f}s, image ids "
        + ", ".join(str(image.id) for image in outcome.generation.images)
    )
    print(out)
    return out


async def _submit_and_run(
    settings: Settings,
    kind: GenerationKind,
    recipes: list[Recipe],
    out: Path | None,
    parent_image_id: int | None = None,
) -> int:
    if out is not None:
        check_out(out)
    deployment = await start_deployment(settings)
    loop = asyncio.get_running_loop()
    name = f"cli-{socket.gethostname()}-{os.getpid()}"
    beating: asyncio.Task[None] | None = None
    stop_beating = asyncio.Event()
    try:
        engine = load_engine(settings, await stored_style_rank(deployment))
        from generation.engine import CancelToken

        cancel = CancelToken()
        # From here a Ctrl-C or SIGTERM stops the engine within a step and cancels the row.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, cancel.cancel)
        # A worker of its own, beating as workers do: a bot on the same database takes
        # over the running jobs of a worker that does not beat (it died, for all it knows).
        beat = _keep_beating(deployment, name, engine.model_id, stop_beating)
        beating = asyncio.create_task(beat)
        for number, recipe in enumerate(recipes):
            async with deployment.database.session() as session:
                generation = await create_generation(
                    session,
                    kind=kind,
                    recipe=recipe,
                    requester_id=LOCAL_USER_ID,
                    parent_image_id=parent_image_id,
                )
                # Claimed as it is made: no worker of the bot's can take it first.
                await heartbeat(session, name, engine.model_id)
                generation = await transition(
                    session, generation.id, GenerationStatus.RUNNING, worker_name=name
                )
            target = out
            if out is not None and len(recipes) > 1:
                target = out.with_name(f"{out.stem}-{number + 1}{out.suffix}")
            await _run(deployment, engine, generation, target, cancel)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if beating is not None:
            await _stop_beating(deployment, name, beating, stop_beating)
        await deployment.close()
    return 0


async def _keep_beating(deployment: Deployment, name: str, model: str, stop: asyncio.Event) -> None:
    """Heartbeats until ``stop``; a beat under way when it is set finishes first (cancelled
    mid-query, the connection pool logs a traceback)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), deployment.settings.worker_heartbeat_seconds)
            return
        try:
            async with deployment.database.session() as session:
                await heartbeat(session, name, model)
        except Exception as exc:  # the database away a while: beat again next time
            log.warning("no heartbeat for %s (%s); trying again", name, exc)


async def _stop_beating(
    deployment: Deployment, name: str, beating: asyncio.Task[None], stop: asyncio.Event
) -> None:
    """Stop the beats, and forget the worker: its jobs are ended."""
    stop.set()
    await asyncio.gather(beating, return_exceptions=True)
    with contextlib.suppress(Exception):  # the database gone: the row just goes stale
        async with deployment.database.session() as session:
            await forget_worker(session, name)


def _generate(args: argparse.Namespace) -> int:
    from bot.prompt import PromptDefaults, parse_prompt
    from generation.styles import StyleRegistry

    settings = _settings(args)
    registry = StyleRegistry.from_folder(settings.resolved_styles_dir)
    family = configured_family(settings.model, settings.model_family)
    defaults = PromptDefaults(model=settings.model, family=family)
    recipes = parse_prompt(args.prompt, defaults, known_styles=registry.names())
    if args.no_wait:
        return asyncio.run(_submit_only(settings, recipes))
    return asyncio.run(_submit_and_run(settings, GenerationKind.IMAGINE, recipes, args.out))


async def _submit_only(settings: Settings, recipes: list[Recipe]) -> int:
    from storage.queue import Submission

    deployment = await start_deployment(settings)
    try:
        for recipe in recipes:
            submission = Submission(GenerationKind.IMAGINE, recipe, LOCAL_USER_ID)
            print((await deployment.queue.submit(submission)).id)
    finally:
        await deployment.close()
    return 0


async def _parent(settings: Settings, image_id: int) -> tuple[Recipe, Image]:
    deployment = await start_deployment(settings)
    try:
        async with deployment.database.session() as session:
            image = await get_image(session, image_id)
            generation = await get_generation(session, image.generation_id)
            return generation.recipe, image
    finally:
        await deployment.close()


def _upscale(args: argparse.Namespace) -> int:
    settings = _settings(args)
    parent, image = asyncio.run(_parent(settings, args.image_id))
    recipe = upscale_recipe(parent, image)
    return asyncio.run(
        _submit_and_run(settings, GenerationKind.UPSCALE, [recipe], args.out, args.image_id)
    )


def _vary(args: argparse.Namespace) -> int:
    settings = _settings(args)
    parent, image = asyncio.run(_parent(settings, args.image_id))
    recipe = variation_recipe(parent, image, strong=args.strong)
    return asyncio.run(
        _submit_and_run(settings, GenerationKind.VARIATION, [recipe], args.out, args.image_id)
    )


def _outpaint(
    args: argparse.Namespace, margins_for: Callable[[Image, ModelFamily], Outpaint]
) -> int:
    settings = _settings(args)
    parent, image = asyncio.run(_parent(settings, args.image_id))
    recipe = outpaint_recipe(parent, image, margins_for(image, family_of(parent)))
    return asyncio.run(
        _submit_and_run(settings, GenerationKind.OUTPAINT, [recipe], args.out, args.image_id)
    )


def _zoom(args: argparse.Namespace) -> int:
    return _outpaint(
        args, lambda image, family: zoom_margins(image.width, image.height, args.factor, family)
    )


def _pan(args: argparse.Namespace) -> int:
    return _outpaint(
        args,
        lambda image, family: pan_margins(image.width, image.height, args.direction, family),
    )


def _reroll(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def parent_recipe() -> Recipe:
        deployment = await start_deployment(settings)
        try:
            async with deployment.database.session() as session:
                return (await get_generation(session, args.generation_id)).recipe
        finally:
            await deployment.close()

    recipe = reroll_recipe(asyncio.run(parent_recipe()))
    return asyncio.run(_submit_and_run(settings, GenerationKind.REROLL, [recipe], args.out))


def _show(args: argparse.Namespace) -> int:
    from bot.prompt import format_recipe

    async def show() -> int:
        deployment = await start_deployment(load_settings())
        try:
            async with deployment.database.session() as session:
                generation = await get_generation(session, args.generation_id)
        finally:
            await deployment.close()
        recipe = generation.recipe
        print(f"generation {generation.id}: {generation.kind.value}, {generation.status.value}")
        if generation.error:
            print(f"error: {generation.error}")
        print(f"prompt: {format_recipe(recipe)}")
        low_bits = f", {recipe.quantization} weights" if recipe.quantization else ""
        print(f"model: {recipe.model} (hash {recipe.model_hash or 'unknown'}{low_bits})")
        print(f"size: {recipe.width}x{recipe.height}, steps {recipe.steps}, cfg {recipe.guidance}")
        if recipe.init_image is not None:
            ref = recipe.init_image
            print(
                f"image prompt: blob {ref.blob_key} ({ref.width}x{ref.height}, sha256 "
                f"{ref.sha256}), --iw {recipe.image_weight:g}, strength {recipe.strength:g}"
            )
        for image in generation.images:
            blobs = deployment.blobs
            where = blobs.path_for(image.blob_key) if isinstance(blobs, LocalBlobStore) else ""
            print(
                f"image {image.id}: #{image.index + 1} seed {image.seed} {where or image.blob_key}"
            )
        print(f"recipe: {recipe.to_json()}")
        return 0

    return asyncio.run(show())


def _styles(args: argparse.Namespace) -> int:
    from generation.styles import StyleRegistry

    settings = load_settings()
    registry = StyleRegistry.from_folder(settings.resolved_styles_dir)
    for problem in registry.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    names = registry.names()
    if not names:
        print(f"no styles in {settings.resolved_styles_dir}; add one TOML file per style there")
        return 0
    for name in names:
        style = registry.get(name)
        print(f"{name}: {style.description} (weight {style.default_weight}, {style.family})")
    return 0
