"""The engine: a resident diffusers pipeline turning recipes into images.

One straight function per generation kind (txt2img, img2img, upscale). The
img2img pipeline comes from ``from_pipe``: it shares every weight with the
text-to-image one. Image *i* of a call gets its own CPU generator seeded
``recipe.seed_for(i)``, so it can be regenerated alone.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting
from PIL import Image

from generation.compiled import (
    CompilePlan,
    Shape,
    WarmShapes,
    compile_pipeline,
    compiled_graphs,
    plan_compile,
)
from generation.controlnet import ControlNets
from generation.controls import ControlRegistry
from generation.loading import LoadedModel, Pipeline, load_model, load_upscaler
from generation.lora import LoraSet, LoraSlots
from generation.metadata import encode_png
from generation.previews import AsyncPreviews, supports_preview, unpack_latent
from generation.styles import StyleRegistry
from storage.controls import ControlError, ControlRef
from storage.derive import UPSCALE_STRENGTH
from storage.errors import ImagineError
from storage.families import ModelFamily, size_for
from storage.recipe import Outpaint, Recipe
from storage.samplers import (
    DEFAULT_SAMPLER,
    Sampler,
    a1111_name,
    a1111_sampler,
    candidates,
    get_sampler,
    unknown_sampler_message,
)
from storage.settings import Settings
from storage.slot_rank import SlotRank, configured_slots

UPSCALE_OVERLAP = 0.125  # of the tile side
WARM_UP_COUNT = 4  # images of a default /imagine grid: the batch a compiled warm-up sizes for
TEST_FAULT_ENV = "IMAGINE_TEST_FAULT"

log = logging.getLogger(__name__)


def build_scheduler(sampler: Sampler, model_default: Any) -> Any:
    """The diffusers scheduler of a listed sampler, from the model's own scheduler config."""
    scheduler_class = getattr(diffusers, sampler.scheduler)
    return scheduler_class.from_config(model_default.config, **sampler.config)


def _settings(scheduler: Any) -> dict[str, Any]:
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def listed_sampler(model_default: Any) -> str | None:
    """The listed sampler that builds exactly the model's own scheduler, if one does."""
    for sampler in candidates(type(model_default).__name__):
        if _settings(build_scheduler(sampler, model_default)) == _settings(model_default):
            return sampler.name
    return None


class GenerationCancelled(ImagineError):
    """The run was cancelled from outside."""

    def __init__(self) -> None:
        super().__init__("The generation was cancelled.")


class OutOfMemory(ImagineError):
    """The images did not fit in the device's memory, even one at a time."""

    def __init__(self, recipe: Recipe, count: int) -> None:
        size = f"{recipe.width}×{recipe.height}"
        if count > 1:
            super().__init__(
                f"{size} × {count} images did not fit in the GPU's memory even one image "
                "at a time; try a smaller --ar or fewer images."
            )
        else:
            super().__init__(
                f"{size} did not fit in the GPU's memory; try a smaller --ar or a smaller image."
            )


class CancelToken:
    """Set from any thread; the engine stops at the end of the current step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    preview: bytes | None = None  # JPEG of the first image, every few steps


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    seed: int
    image: Image.Image
    png: bytes  # empty when the caller encodes it (``encode=False``)
    recipe: Recipe  # this image alone: its own seed, count 1
    sampler: str = ""  # AUTOMATIC1111's name of the sampler that ran: what its PNG says

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


PNG_ENCODERS = ThreadPoolExecutor(
    max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="imagine-png"
)


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("imagine", "diffusers", "torch", "transformers", "peft"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


class Engine:
    """One resident model on one device. Not thread-safe: one job at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        styles: StyleRegistry | None = None,
        lora_cache_size: int = 8,
        preview_every: int = 5,
        upscale_tile: int = 0,
        upscaler: Pipeline | None = None,
        lora_folder: Path | None = None,
        compile_plan: CompilePlan | None = None,
        lora_slots: int = 2,
        lora_slot_rank: SlotRank | int = 64,
        controls: ControlNets | None = None,
        max_batch: int = 1,
        warm_up_ratios: Sequence[tuple[int, int] | None] = (None,),
    ) -> None:
        self.loaded = loaded
        self.warm_up_ratios = list(warm_up_ratios)
        self.warm_shapes = WarmShapes()
        self.max_batch = max_batch
        self.controls = controls
        self.pipe: Pipeline = loaded.pipe
        self.compile_plan = compile_plan or CompilePlan(False, "off")
        self.loras: LoraSet | LoraSlots
        if self.compile_plan.enabled:
            # Slots before compiling: the compiled graph then has them, and swaps keep it.
            self.loras = LoraSlots(self.pipe, lora_slots, lora_slot_rank, lora_cache_size)
            compile_pipeline(
                self.pipe, fuse_qkv=lora_slots == 0, cache_dir=self.compile_plan.cache_dir
            )
        else:
            self.loras = LoraSet(self.pipe, lora_cache_size)
        self.img2img_pipe: Pipeline = AutoPipelineForImage2Image.from_pipe(self.pipe)
        self.img2img_pipe.set_progress_bar_config(disable=True)
        # FLUX's img2img sizes its output from width and height (else 1024 for every
        # image); the SD pipelines take the size of the image they are given.
        self._img2img_takes_size = "width" in inspect.signature(self.img2img_pipe).parameters
        self._inpaint_pipe: Pipeline | None = None
        self.styles = styles or StyleRegistry()
        # Where LoRAs of styles stored in the database are written before loading.
        self.lora_folder = lora_folder or Path(tempfile.gettempdir()) / "imagine-loras"
        self.preview_every = preview_every
        self.busy_seconds = 0.0
        """Seconds spent in the pipelines' calls (denoising and decoding): a busy worker
        whose engine is busy much less than the wall clock waits on its own bookkeeping."""
        self.upscale_tile = upscale_tile or 2 * loaded.family.native_side
        self.upscaler = upscaler
        self._default_scheduler = self.pipe.scheduler
        # What ``default`` runs: named as a listed sampler when one builds the very same
        # scheduler, so the recipe and the PNG say what ran; else A1111's name for it.
        self.default_sampler = listed_sampler(self._default_scheduler) or DEFAULT_SAMPLER
        self._default_a1111 = a1111_name(
            type(self._default_scheduler).__name__, self._default_scheduler.config
        )
        self._versions = library_versions()

    @classmethod
    def from_settings(
        cls, settings: Settings, model: str | None = None, stored_style_rank: int = 0
    ) -> Engine:
        """The engine ``settings`` describe. ``stored_style_rank`` is the largest rank of
        the styles in the database (:func:`storage.slot_rank.stored_style_rank`): with the
        styles folder's, it sizes a compiled engine's style slots."""
        loaded = load_model(settings, model)
        upscaler = None
        if settings.upscaler:
            upscaler = load_upscaler(settings, loaded.device, loaded.dtype)
        styles = StyleRegistry.from_folder(settings.resolved_styles_dir)
        compile_plan = plan_compile(
            settings.compile,
            loaded.device,
            loaded.offload,
            cache_dir=settings.data_dir / "cache" / "compiled",
        )
        slot_rank = configured_slots(settings, [stored_style_rank, *styles.lora_ranks()])
        if compile_plan.enabled and settings.lora_slots:
            log.info(slot_rank.describe())
        return cls(
            loaded,
            styles=styles,
            lora_cache_size=settings.lora_cache_size,
            preview_every=settings.preview_every,
            upscale_tile=settings.upscale_tile,
            upscaler=upscaler,
            lora_folder=settings.data_dir / "lora-cache",
            compile_plan=compile_plan,
            lora_slots=settings.lora_slots,
            lora_slot_rank=slot_rank,
            max_batch=settings.max_batch,
            warm_up_ratios=settings.compile_ratios,
            controls=ControlNets(
                ControlRegistry.from_folder(settings.resolved_controls_dir),
                settings,
                loaded.family.name,
                loaded.device,
                loaded.dtype,
            ),
        )

    @property
    def family(self) -> ModelFamily:
        return self.loaded.family

    @property
    def model_id(self) -> str:
        return self.loaded.source.model

    @property
    def model_hash(self) -> str:
        return self.loaded.model_hash

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    def complete_recipe(self, recipe: Recipe) -> Recipe:
        """The recipe with what only the engine knows: hashes, family, dtype, versions, and
        the sampler ``default`` stands for on this model."""
        styles = tuple(
            ref.model_copy(update={"sha256": self.styles.get(ref.name).sha256})
            for ref in recipe.styles
        )
        controls = recipe.controls
        if controls:
            controls = tuple(self._control_nets().complete(ref) for ref in controls)
        return recipe.model_copy(
            update={
                "controls": controls,
                "model_hash": self.model_hash,
                "model_family": self.family.name,
                "dtype": str(self.loaded.dtype).removeprefix("torch."),
                "quantization": self.loaded.quantization,
                "versions": self._versions,
                "styles": styles,
                "sampler": self.default_sampler
                if recipe.sampler == DEFAULT_SAMPLER
                else recipe.sampler,
            }
        )

    def warm_up_sizes(self) -> list[tuple[int, int]]:
        """The native size; compiled, the sizes of the ratios ``IMAGINE_COMPILE_SIZES``
        names (the native one when it names none)."""
        if not self.compile_plan.enabled:
            return [size_for(None, self.family)]
        sizes = [size_for(ratio, self.family) for ratio in self.warm_up_ratios or [None]]
        return list(dict.fromkeys(sizes))

    def warm_up(
        self,
        sizes: Sequence[tuple[int, int]] | None = None,
        count: int | None = None,
        *,
        styled: bool | None = None,
    ) -> float:
        """Single-step images before the first user's job: kernels chosen, memory taken
        and, compiled, one graph per size, for a grid and for a full batch of jobs, with
        and without the style slots (``styled`` picks one). Returns the seconds it took."""
        started = time.perf_counter()
        graphs = compiled_graphs()
        sizes = sizes or self.warm_up_sizes()
        counts = [count or (WARM_UP_COUNT if self.compile_plan.enabled else 1)]
        if count is None and self.compile_plan.enabled and self.max_batch > WARM_UP_COUNT:
            counts.append(self.max_batch)
        styled_path = getattr(self.loras, "styled_path", None)
        paths = [nullcontext, styled_path] if styled_path is not None else [nullcontext]
        if styled is not None:
            paths = [styled_path if styled and styled_path is not None else nullcontext]
        runs = [(size, path, count) for size in sizes for path in paths for count in counts]
        warming = self.warm_shapes.warming_up() if self.compile_plan.enabled else nullcontext()
        with warming:
            self._warm_up_runs(runs, started)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        log.info(
            "compile %s; warmed up %d run(s) of %s image(s) in %.1fs, %d graph(s) compiled",
            self.compile_plan.reason,
            len(runs),
            " or ".join(map(str, counts)),
            seconds,
            compiled_graphs() - graphs,
        )
        return seconds

    def _warm_up_runs(
        self, runs: Sequence[tuple[tuple[int, int], Any, int]], started: float
    ) -> None:
        for number, ((width, height), path, count) in enumerate(runs, start=1):
            if self.compile_plan.enabled:  # compiling a size takes a minute the first time
                log.info(
                    "warm-up %d/%d: %dx%d, %d image(s)%s, %.0fs so far",
                    number,
                    len(runs),
                    width,
                    height,
                    count,
                    " with style slots" if path is not nullcontext else "",
                    time.perf_counter() - started,
                )
            recipe = Recipe(
                model=self.model_id,
                prompt="warm-up",
                seed=0,
                width=width,
                height=height,
                steps=1,
                guidance=self.family.default_guidance,
                count=count,
            )
            with path():
                self._run(
                    self.pipe, recipe, {"width": width, "height": height}, None, None, encode=False
                )

    def txt2img(
        self,
        recipe: Recipe,
        *,
        maps: Sequence[Image.Image] = (),
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        encode: bool = True,
    ) -> list[GeneratedImage]:
        """``recipe.count`` images in one batched call; ``maps`` are the control maps of
        ``recipe.controls``, in order (see :meth:`control_map`). Their PNGs unless ``encode``
        is False (the job's finishing encodes them off the GPU's critical path)."""
        extra: dict[str, Any] = {"width": recipe.width, "height": recipe.height}
        pipe = self._controlled(self.pipe, "txt2img", recipe, maps, extra)
        return self._run(pipe, recipe, extra, progress, cancel, encode=encode)

    def txt2img_batch(
        self,
        recipes: Sequence[Recipe],
        *,
        progress: Sequence[ProgressCallback | None] = (),
        cancel: Sequence[CancelToken | None] = (),
        encode: bool = True,
    ) -> list[list[GeneratedImage]]:
        """The images of several recipes in one batched call, each as :meth:`txt2img` makes
        it alone (its own generator per image). The recipes share what
        :func:`storage.scheduling.batch_key` says; prompts, negatives, seeds and counts may
        differ. ``progress[j]`` and ``cancel[j]`` are recipe *j*'s: the call stops when
        every recipe is cancelled, and a recipe cancelled before the end gets no images."""
        progress = list(progress) or [None] * len(recipes)
        cancel = list(cancel) or [None] * len(recipes)
        if len(recipes) == 1:
            return [self.txt2img(recipes[0], progress=progress[0], cancel=cancel[0], encode=encode)]
        self._check_size(recipes[0].width, recipes[0].height)  # one size for all (the batch key)
        listeners: list[_Listener] = []
        prompts: list[str] = []
        negatives: list[str] = []
        seeds: list[int] = []
        first = recipes[0]
        self._apply_styles(first)  # one style set for all (the batch key): its LoRAs once
        for recipe, each, token in zip(recipes, progress, cancel, strict=True):
            text = self._text_inputs(self.pipe, *self._styled_prompts(recipe))
            listeners.append(_Listener(range(len(seeds), len(seeds) + recipe.count), each, token))
            prompts += [text["prompt"]] * recipe.count
            negatives += [text.get("negative_prompt") or ""] * recipe.count
            seeds += [recipe.seed_for(i) for i in range(recipe.count)]
        if all(listener.cancelled for listener in listeners):
            raise GenerationCancelled()
        sampler = self._use_scheduler(self.pipe, first.sampler)
        call = {
            **text,  # the family's other text inputs, the same for every recipe
            "prompt": prompts,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "callback_on_step_end_tensor_inputs": ["latents"],
            "width": first.width,
            "height": first.height,
        }
        if self.family.negative_prompt:
            if any(negatives) and not all(negatives):
                raise ImagineError("Jobs of one batch either all have a negative prompt or none.")
            call["negative_prompt"] = negatives if all(negatives) else None
        images = self._denoise(self.pipe, first, call, seeds, listeners)
        made: list[list[GeneratedImage]] = []
        for recipe, listener in zip(recipes, listeners, strict=True):
            mine = [images[number] for number in listener.numbers]
            if listener.cancelled:
                made.append([])
            else:
                made.append(self._generated(recipe, _all_made(mine), sampler, encode))
        return made

    def img2img(
        self,
        recipe: Recipe,
        source: Image.Image,
        *,
        maps: Sequence[Image.Image] = (),
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        encode: bool = True,
    ) -> list[GeneratedImage]:
        """Variations of ``source`` at ``recipe.strength``, in one batched call."""
        if recipe.strength is None:
            raise ImagineError("A variation needs a strength between 0 and 1.")
        image = source.convert("RGB").resize(
            (recipe.width, recipe.height), Image.Resampling.LANCZOS
        )
        extra = self._img2img_inputs(image, recipe.strength, recipe.count)
        pipe = self._controlled(self.img2img_pipe, "img2img", recipe, maps, extra)
        recipe = _at_least_one_step(recipe)
        return self._run(pipe, recipe, extra, progress, cancel, encode=encode)

    def control_map(
        self, ref: ControlRef, source: Image.Image, recipe: Recipe
    ) -> tuple[ControlRef, Image.Image]:
        """The map of ``source`` for control ``ref`` at the recipe's size, made by the
        control's preprocessor (or ``source`` itself, for a raw one), and ``ref`` naming it."""
        return self._control_nets().make_map(ref, source, (recipe.width, recipe.height))

    def _control_nets(self) -> ControlNets:
        if self.controls is None:
            raise ControlError("This worker runs no controls; start it with a controls folder.")
        return self.controls

    def _controlled(
        self,
        pipe: Pipeline,
        kind: str,
        recipe: Recipe,
        maps: Sequence[Image.Image],
        extra: dict[str, Any],
    ) -> Pipeline:
        """``pipe`` itself, or its ControlNet sibling with the control arguments in ``extra``."""
        if not recipe.controls and not maps:
            return pipe
        nets = self._control_nets()
        size = (recipe.width, recipe.height)
        extra.update(nets.arguments(kind, recipe.controls, maps, size))
        return nets.pipeline(self.pipe, kind, recipe.controls)

    def _img2img_inputs(self, image: Image.Image, strength: float, count: int) -> dict[str, Any]:
        # One copy per image: each is encoded with its own generator, so image i of a batch
        # is image i alone (and SD3's img2img needs it: it slices the batch per generator).
        extra: dict[str, Any] = {"image": [image] * count, "strength": strength}
        if self._img2img_takes_size:
            extra |= {"width": image.width, "height": image.height}
        return extra

    @property
    def inpaint_pipe(self) -> Pipeline:
        """The inpainting pipeline on the same weights (``from_pipe``), made when first used."""
        if self._inpaint_pipe is None:
            self._inpaint_pipe = AutoPipelineForInpainting.from_pipe(self.pipe)
            self._inpaint_pipe.set_progress_bar_config(disable=True)
        return self._inpaint_pipe

    def outpaint(
        self,
        recipe: Recipe,
        source: Image.Image,
        *,
        maps: Sequence[Image.Image] = (),
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        encode: bool = True,
    ) -> list[GeneratedImage]:
        """Zoom Out and Pan: ``source`` on a larger canvas, the new area generated around it
        and the source's own pixels put back unchanged. ``maps`` are the control maps of
        ``recipe.controls`` at the canvas's size, run by the family's ControlNet inpainting
        pipeline; a family that has none refuses them before any work."""
        margins = recipe.outpaint
        if margins is None:
            raise ImagineError("Zoom Out and Pan need the margins to add around the image.")
        if recipe.controls or maps:
            self._control_nets().check_kind("inpaint")
        source = source.convert("RGB")
        canvas_size = (
            source.width + margins.left + margins.right,
            source.height + margins.top + margins.bottom,
        )
        if canvas_size != (recipe.width, recipe.height):
            raise ImagineError(
                f"The recipe's canvas is {recipe.width}×{recipe.height} but its source "
                f"{source.width}×{source.height} with its margins makes "
                f"{canvas_size[0]}×{canvas_size[1]}."
            )
        canvas, mask = outpaint_canvas(source, margins)
        corner = (margins.left, margins.top)

        def keep_source(image: Image.Image) -> Image.Image:
            kept = image.convert("RGB")
            kept.paste(source, corner)
            return kept

        # One canvas per image: the inpaint pipeline encodes its image with the generator of
        # the image in the same place, so each image's generator advances as it would alone.
        extra = {
            "image": [canvas] * recipe.count,
            "mask_image": [mask] * recipe.count,
            "strength": 1.0,
            "width": recipe.width,
            "height": recipe.height,
        }
        pipe = self._controlled(self.inpaint_pipe, "inpaint", recipe, maps, extra)
        return self._run(pipe, recipe, extra, progress, cancel, encode=encode, finish=keep_source)

    def upscale(
        self,
        recipe: Recipe,
        source: Image.Image,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        encode: bool = True,
    ) -> GeneratedImage:
        """``source`` at ``recipe.scale`` × its size.

        With a dedicated upscaler its output is fitted to the exact size; otherwise a
        Lanczos resize gets a tiled img2img detail pass from the loaded model.
        """
        scale = recipe.scale or 2
        target = (source.width * scale, source.height * scale)
        if self.upscaler is not None:
            return self._dedicated_upscale(recipe, source, target, progress, cancel, encode)
        resized = source.convert("RGB").resize(target, Image.Resampling.LANCZOS)
        strength = recipe.strength or UPSCALE_STRENGTH
        recipe = _at_least_one_step(
            recipe.model_copy(
                update={"count": 1, "strength": strength, "width": target[0], "height": target[1]}
            )
        )
        step = self.family.size_step  # a tile is a generation too: its sides fit the family
        tile_side = max(step, self.upscale_tile // step * step)
        tiles = list(_tiles(target, tile_side))
        canvas = np.zeros((target[1], target[0], 3), dtype=np.float64)
        weight = np.zeros((target[1], target[0], 1), dtype=np.float64)
        overlap = max(8, int(tile_side * UPSCALE_OVERLAP))
        for number, (left, top, right, bottom) in enumerate(tiles):
            tile = resized.crop((left, top, right, bottom))
            tile_recipe = recipe.model_copy(update={"width": right - left, "height": bottom - top})

            def tile_progress(p: Progress, number: int = number) -> None:
                if progress is not None:
                    total = p.total * len(tiles)
                    progress(Progress(number * p.total + p.step, total, p.preview))

            (detailed,) = self._run(
                self.img2img_pipe,
                tile_recipe,
                self._img2img_inputs(tile, strength, 1),
                tile_progress,
                cancel,
                encode=False,
            )
            mask = _feather(
                (right - left, bottom - top), overlap, (left, top, right, bottom), target
            )
            pixels = np.asarray(detailed.image.convert("RGB"), dtype=np.float64)
            canvas[top:bottom, left:right] += pixels * mask
            weight[top:bottom, left:right] += mask
        blended = np.clip(np.rint(canvas / np.maximum(weight, 1e-8)), 0, 255).astype(np.uint8)
        image = Image.fromarray(blended, "RGB")
        final = self.complete_recipe(recipe)
        sampler = self.a1111_sampler(final.sampler)
        png = encode_png(image, final, sampler) if encode else b""
        return GeneratedImage(0, recipe.seed, image, png, final, sampler)

    def _check_size(self, width: int, height: int) -> None:
        """Refuses, with a sentence, a size the family's pipelines would refuse or round."""
        refusal = self.family.size_refusal(width, height)
        if refusal is not None:
            raise ImagineError(refusal)

    def _run(
        self,
        pipe: Pipeline,
        recipe: Recipe,
        extra: dict[str, Any],
        progress: ProgressCallback | None,
        cancel: CancelToken | None,
        *,
        encode: bool = True,
        finish: Callable[[Image.Image], Image.Image] | None = None,
    ) -> list[GeneratedImage]:
        if cancel is not None and cancel.cancelled:
            raise GenerationCancelled()
        self._check_size(recipe.width, recipe.height)
        prompt, negative = self._apply_styles(recipe)
        text = self._text_inputs(pipe, prompt, negative)
        sampler = self._use_scheduler(pipe, recipe.sampler)
        call = {
            **text,
            "num_inference_steps": recipe.steps,
            "guidance_scale": recipe.guidance,
            "callback_on_step_end_tensor_inputs": ["latents"],
            **extra,
        }
        seeds = [recipe.seed_for(i) for i in range(recipe.count)]
        listener = _Listener(range(len(seeds)), progress, cancel)
        images = _all_made(self._denoise(pipe, recipe, call, seeds, [listener]))
        if finish is not None:
            images = [finish(image) for image in images]
        return self._generated(recipe, images, sampler, encode)

    def _generated(
        self, recipe: Recipe, images: list[Image.Image], sampler: str, encode: bool
    ) -> list[GeneratedImage]:
        """``recipe``'s images, each with its own recipe and (``encode``) its PNG."""
        final = self.complete_recipe(recipe)
        owns = [
            final.model_copy(update={"seed": recipe.seed_for(index), "count": 1})
            for index in range(len(images))
        ]
        pngs: list[bytes] = [b""] * len(owns)
        if encode:
            # zlib releases the GIL: a grid's PNGs encode side by side, not one after another.
            pngs = list(
                PNG_ENCODERS.map(
                    lambda pair: encode_png(pair[0], pair[1], sampler),
                    zip(images, owns, strict=True),
                )
            )
        return [
            GeneratedImage(index, own.seed, image, png, own, sampler)
            for index, (image, own, png) in enumerate(zip(images, owns, pngs, strict=True))
        ]

    def _text_inputs(self, pipe: Pipeline, prompt: str, negative: str) -> dict[str, Any]:
        """The prompt arguments the family takes; refuses what it would drop or cut."""
        family = self.family
        text: dict[str, Any] = {"prompt": prompt}
        if family.negative_prompt:
            text["negative_prompt"] = negative or None
        elif negative:
            raise ImagineError(
                f"{family.shown_name} has no negative prompt, but this generation has one "
                f"({_shown(negative)}), probably from a style's negative template; describe "
                "what you want instead, or use a style made for this model."
            )
        if family.max_sequence_length is not None:
            limit = family.max_sequence_length
            text["max_sequence_length"] = limit
            tokenizer = getattr(pipe, family.t5_tokenizer or "", None)
            if tokenizer is not None:
                tokens = len(tokenizer(prompt).input_ids)  # with its end-of-text token
                if tokens > limit:
                    raise ImagineError(
                        f"The prompt is {tokens} T5 tokens long (styles' words included); "
                        f"{family.shown_name} reads at most {limit}, and Imagine does not cut "
                        f"prompts silently. Shorten it by {tokens - limit} tokens or more "
                        "(a token is a short word or a piece of a longer one)."
                    )
        return text

    def _denoise(
        self,
        pipe: Pipeline,
        recipe: Recipe,
        call: dict[str, Any],
        seeds: Sequence[int],
        listeners: Sequence[_Listener],
    ) -> list[Image.Image | None]:
        """The images of ``seeds`` in one batched call; when that runs out of device memory,
        once more one image at a time after freeing the cache (the same images, each from
        its own generator); when that does too, :class:`OutOfMemory` says what did not fit.

        ``call``'s prompt is one for every image, or a list with one per image (a batch of
        recipes). Each listener hears of its images' progress; the call stops when all are
        cancelled. One at a time, a cancelled listener's images are skipped (``None``)."""
        per_image = isinstance(call["prompt"], list)
        size = (recipe.width, recipe.height)

        def one_call(numbers: Sequence[int]) -> list[Any]:
            texts = {
                key: [call[key][number] for number in numbers]
                for key in ("prompt", "negative_prompt")
                if per_image and isinstance(call.get(key), list)
            }
            prompts = texts.get("prompt", [recipe.prompt])
            _injected_out_of_memory(" ".join(prompts), len(numbers))
            with self._busy(), self._stance(size, len(numbers)):
                result = pipe(
                    **(call | texts),
                    num_images_per_prompt=1 if per_image else len(numbers),
                    generator=[torch.Generator("cpu").manual_seed(seeds[n]) for n in numbers],
                    callback_on_step_end=self._listening(listeners, numbers, size),
                )
            return list(result.images)

        try:
            return one_call(range(len(seeds)))
        except torch.OutOfMemoryError as exc:
            log.warning(
                "%d image(s) of %dx%d ran out of memory (%s); one at a time now",
                len(seeds),
                recipe.width,
                recipe.height,
                exc,
            )
        # Freed outside the handler: the exception's traceback holds the failed call's tensors.
        self._free_memory()
        images: list[Image.Image | None] = []
        try:
            for number in range(len(seeds)):
                owner = next(each for each in listeners if number in each.numbers)
                if owner.cancelled:
                    if all(listener.cancelled for listener in listeners):
                        raise GenerationCancelled()
                    images.append(None)
                    continue
                images += one_call([number])
            return images
        except torch.OutOfMemoryError:
            log.warning(
                "%dx%d ran out of memory one image at a time too", recipe.width, recipe.height
            )
        images.clear()
        self._free_memory()
        raise OutOfMemory(recipe, len(seeds))

    def _listening(
        self, listeners: Sequence[_Listener], numbers: Sequence[int], size: tuple[int, int]
    ) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
        """The step callback of a call making the images ``numbers``: each listener with
        images among them hears of its progress (one of its images at a time: its share of
        the whole) and sees previews of its first one there; all cancelled, the call stops."""
        heard: list[tuple[_Listener, ProgressCallback | None, int]] = []
        for listener in listeners:
            mine = [place for place, number in enumerate(numbers) if number in listener.numbers]
            if not mine:
                continue
            progress = listener.progress
            if progress is not None and len(mine) < len(listener.numbers):
                progress = _share(
                    progress,
                    listener.numbers.index(numbers[mine[0]]),
                    len(mine),
                    len(listener.numbers),
                )
            heard.append((listener, progress, mine[0]))
        if len(heard) == 1:
            listener, progress, first = heard[0]
            return self._step_callback(progress, listener.cancel, size=size, first=first)
        callbacks = [
            (listener, self._step_callback(progress, None, size=size, first=first))
            for listener, progress, first in heard
        ]

        def on_step_end(pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if all(listener.cancelled for listener, _ in callbacks):
                raise GenerationCancelled()
            for listener, callback in callbacks:
                if not listener.cancelled:
                    tensors = callback(pipe, step, t, tensors)
            return tensors

        return on_step_end

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def _styled_prompts(self, recipe: Recipe) -> tuple[str, str]:
        """The prompt and negative prompt with the templates of ``recipe``'s styles."""
        prompt, negative = recipe.prompt, recipe.negative_prompt
        for ref in recipe.styles:
            prompt, negative = self.styles.get(ref.name).apply_to_prompt(prompt, negative)
        return prompt, negative

    @contextmanager
    def _busy(self) -> Iterator[None]:
        """Counts the time inside, failed calls included, in :attr:`busy_seconds`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.busy_seconds += time.perf_counter() - started

    def _stance(self, size: tuple[int, int], images: int) -> Any:
        """Compiled, after the warm-up: the warmed-up shapes run compiled, others eagerly."""
        if not self.compile_plan.enabled:
            return nullcontext()
        slots = self.loras if isinstance(self.loras, LoraSlots) else None
        rank = slots.rank if slots is not None and slots.enabled else 0
        return self.warm_shapes.stance(Shape(*size, images, rank))

    def _apply_styles(self, recipe: Recipe) -> tuple[str, str]:
        """Styled prompts, with the styles' LoRAs active at their weights."""
        active = [(self.styles.get(ref.name), ref.weight) for ref in recipe.styles]
        self.loras.activate(active)
        return self._styled_prompts(recipe)

    def a1111_sampler(self, sampler_name: str) -> str:
        """How AUTOMATIC1111 names what ``sampler_name`` runs on this model."""
        listed = a1111_sampler(sampler_name)
        if listed is not None:
            return listed
        if sampler_name == DEFAULT_SAMPLER:
            return self._default_a1111
        raise ImagineError(unknown_sampler_message(sampler_name))

    def _use_scheduler(self, pipe: Pipeline, sampler_name: str) -> str:
        """Sets the pipeline's scheduler; returns its A1111 name."""
        name = self.a1111_sampler(sampler_name)  # refuses an unknown sampler
        sampler = get_sampler(sampler_name)
        if sampler is None:
            pipe.scheduler = self._default_scheduler
        else:
            pipe.scheduler = build_scheduler(sampler, self._default_scheduler)
        return name

    def _dedicated_upscale(
        self,
        recipe: Recipe,
        source: Image.Image,
        target: tuple[int, int],
        progress: ProgressCallback | None,
        cancel: CancelToken | None,
        encode: bool,
    ) -> GeneratedImage:
        if cancel is not None and cancel.cancelled:
            raise GenerationCancelled()
        prompt, negative = recipe.prompt, recipe.negative_prompt
        for ref in recipe.styles:  # their words, not their LoRAs: those fit the base model
            prompt, negative = self.styles.get(ref.name).apply_to_prompt(prompt, negative)
        on_step = self._step_callback(progress, cancel, total=recipe.steps, previews=False)
        upscaler = self.upscaler
        assert upscaler is not None
        with self._busy():
            result = upscaler(
                prompt=prompt,
                negative_prompt=negative or None,
                image=source.convert("RGB"),
                num_inference_steps=recipe.steps,
                guidance_scale=recipe.guidance,
                generator=torch.Generator("cpu").manual_seed(recipe.seed),
                callback=lambda step, t, latents: on_step(upscaler, step, t, {"latents": latents}),
            )
        image = result.images[0]
        if image.size != target:  # e.g. the x4 upscaler asked for 2x
            image = image.resize(target, Image.Resampling.LANCZOS)
        final = self.complete_recipe(
            recipe.model_copy(update={"count": 1, "width": target[0], "height": target[1]})
        )
        sampler = a1111_name(type(upscaler.scheduler).__name__, upscaler.scheduler.config)
        png = encode_png(image, final, sampler) if encode else b""
        return GeneratedImage(0, recipe.seed, image, png, final, sampler)

    def _step_callback(
        self,
        progress: ProgressCallback | None,
        cancel: CancelToken | None,
        *,
        total: int | None = None,
        previews: bool = True,
        size: tuple[int, int] = (0, 0),
        first: int = 0,
    ) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
        """Progress (previews of image ``first`` of the call) and cancel at each step."""
        latent_format = self.family.latent_format if previews else ""
        packed = self.family.packed_latents
        fixed_total = total
        every = self.preview_every
        # Only for a listener, and beside the loop: no device sync at any step.
        shown: AsyncPreviews | None = None
        if progress is not None and supports_preview(latent_format):
            shown = AsyncPreviews(latent_format, lambda *shot: progress(Progress(*shot)))

        def first_latent(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
            if packed:
                return unpack_latent(latents[first], size, pipe.vae_scale_factor)
            return latents[first]

        def on_step_end(
            pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            if cancel is not None and cancel.cancelled:
                raise GenerationCancelled()
            if progress is not None:
                total = fixed_total or int(getattr(pipe, "num_timesteps", 0) or step + 1)
                done = step + 1
                progress(Progress(done, total))
                if shown is not None and done % every == 0 and done < total:
                    shown.offer(done, total, first_latent(pipe, tensors["latents"]))
            return tensors

        return on_step_end


@dataclass(frozen=True)
class _Listener:
    """One recipe's images in a denoising call (``numbers``) and who hears of them."""

    numbers: range
    progress: ProgressCallback | None
    cancel: CancelToken | None

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.cancelled


def _share(progress: ProgressCallback, done: int, count: int, total: int) -> ProgressCallback:
    """``progress`` of images ``done`` to ``done + count`` of ``total``, made apart from
    the others: each step counts as its share of the whole."""

    def report(p: Progress) -> None:
        progress(Progress(done * p.total + p.step * count, p.total * total, p.preview))

    return report


def _all_made(images: list[Image.Image | None]) -> list[Image.Image]:
    """The images, none skipped: one skipped was cancelled."""
    made = [image for image in images if image is not None]
    if len(made) < len(images):
        raise GenerationCancelled()
    return made


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def outpaint_canvas(source: Image.Image, margins: Outpaint) -> tuple[Image.Image, Image.Image]:
    """The canvas (the source, its edges stretched over the new area) and the mask (white:
    generate), which reaches ``margins.overlap`` pixels into the source on extended sides
    so the new area is painted to continue it."""
    pixels = np.asarray(source.convert("RGB"))
    padded = np.pad(
        pixels,
        ((margins.top, margins.bottom), (margins.left, margins.right), (0, 0)),
        mode="edge",
    )
    mask = np.full(padded.shape[:2], 255, dtype=np.uint8)
    overlap = margins.overlap
    left = margins.left + (overlap if margins.left else 0)
    top = margins.top + (overlap if margins.top else 0)
    right = margins.left + source.width - (overlap if margins.right else 0)
    bottom = margins.top + source.height - (overlap if margins.bottom else 0)
    mask[top:bottom, left:right] = 0
    return Image.fromarray(padded, "RGB"), Image.fromarray(mask, "L")


def _injected_out_of_memory(prompt: str, batch: int) -> None:
    """For the fault tests only (never set it elsewhere): ``IMAGINE_TEST_FAULT=oom:WORD``
    makes every call of more than one image run out of memory when the prompt contains
    WORD, as a GPU would; ``oom-always:WORD`` every call."""
    kind, _, word = os.environ.get(TEST_FAULT_ENV, "").partition(":")
    if word and word in prompt and (kind == "oom-always" or (kind == "oom" and batch > 1)):
        raise torch.OutOfMemoryError(f"{TEST_FAULT_ENV}: out of memory on purpose")


def _at_least_one_step(recipe: Recipe) -> Recipe:
    # img2img runs int(steps * strength) steps; zero would return the input unchanged.
    strength = recipe.strength or 1.0
    if int(recipe.steps * strength) >= 1:
        return recipe
    return recipe.model_copy(update={"steps": math.ceil(1 / strength)})


def _tiles(size: tuple[int, int], tile: int) -> Sequence[tuple[int, int, int, int]]:
    """Tiles of ``tile`` pixels a side (the image's side where it is smaller) covering
    ``size`` with overlap."""
    width, height = size
    overlap = max(8, int(tile * UPSCALE_OVERLAP) // 8 * 8)

    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        stride = tile - overlap
        positions = list(range(0, length - tile, stride))
        positions.append(length - tile)
        return positions

    tile_w, tile_h = min(tile, width), min(tile, height)
    return [
        (left, top, left + tile_w, top + tile_h) for top in starts(height) for left in starts(width)
    ]


def _feather(
    tile_size: tuple[int, int],
    overlap: int,
    box: tuple[int, int, int, int],
    canvas: tuple[int, int],
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Blend weights ramping up over ``overlap`` pixels on edges shared with other tiles."""
    width, height = tile_size
    left, top, right, bottom = box

    def ramp(length: int, fade_start: bool, fade_end: bool) -> np.ndarray[Any, Any]:
        weights = np.ones(length)
        span = min(overlap, length // 2)
        edge = (np.arange(span) + 1) / (span + 1)
        if fade_start:
            weights[:span] = edge
        if fade_end:
            weights[length - span :] = edge[::-1]
        return weights

    horizontal = ramp(width, left > 0, right < canvas[0])
    vertical = ramp(height, top > 0, bottom < canvas[1])
    return np.outer(vertical, horizontal)[:, :, None]
