"""The engine: a resident diffusers pipeline turning recipes into images.

One straight function per generation kind (txt2img, img2img, upscale). The
img2img pipeline comes from ``from_pipe``: it shares every weight with the
text-to-image one. Image *i* of a call gets its own CPU generator seeded
``recipe.seed_for(i)``, so it can be regenerated alone.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import AutoPipelineForImage2Image
from PIL import Image

from generation.compiled import (
    CompilePlan,
    compile_pipeline,
    compiled_graphs,
    mark_warm,
    plan_compile,
)
from generation.loading import LoadedModel, Pipeline, load_model, load_upscaler
from generation.lora import LoraSet, LoraSlots
from generation.metadata import encode_png
from generation.previews import latent_preview, preview_bytes, supports_preview
from generation.styles import StyleRegistry
from storage.derive import UPSCALE_STRENGTH
from storage.errors import ImagineError
from storage.families import ASPECT_RATIOS, ModelFamily, size_for
from storage.recipe import Recipe
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

UPSCALE_OVERLAP = 0.125  # of the tile side
WARM_UP_COUNT = 4  # images of a default /imagine grid: the batch a compiled warm-up sizes for

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
    png: bytes
    recipe: Recipe  # this image alone: its own seed, count 1

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
        lora_max_rank: int = 64,
        max_batch: int = 1,
    ) -> None:
        self.loaded = loaded
        self.max_batch = max_batch
        self.pipe: Pipeline = loaded.pipe
        self.compile_plan = compile_plan or CompilePlan(False, "off")
        self.loras: LoraSet | LoraSlots
        if self.compile_plan.enabled:
            # Slots before compiling: the compiled graph then has them, and swaps keep it.
            self.loras = LoraSlots(self.pipe, lora_slots, lora_max_rank, lora_cache_size)
            compile_pipeline(self.pipe, fuse_qkv=lora_slots == 0)
        else:
            self.loras = LoraSet(self.pipe, lora_cache_size)
        self.img2img_pipe: Pipeline = AutoPipelineForImage2Image.from_pipe(self.pipe)
        self.img2img_pipe.set_progress_bar_config(disable=True)
        self.styles = styles or StyleRegistry()
        # Where LoRAs of styles stored in the database are written before loading.
        self.lora_folder = lora_folder or Path(tempfile.gettempdir()) / "imagine-loras"
        self.preview_every = preview_every
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
    def from_settings(cls, settings: Settings, model: str | None = None) -> Engine:
        loaded = load_model(settings, model)
        upscaler = None
        if settings.upscaler:
            upscaler = load_upscaler(settings, loaded.device, loaded.dtype)
        return cls(
            loaded,
            styles=StyleRegistry.from_folder(settings.resolved_styles_dir),
            lora_cache_size=settings.lora_cache_size,
            preview_every=settings.preview_every,
            upscale_tile=settings.upscale_tile,
            upscaler=upscaler,
            lora_folder=settings.data_dir / "lora-cache",
            compile_plan=plan_compile(settings.compile, loaded.device),
            lora_slots=settings.lora_slots,
            lora_max_rank=settings.lora_max_rank,
            max_batch=settings.max_batch,
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
        return recipe.model_copy(
            update={
                "model_hash": self.model_hash,
                "model_family": self.family.name,
                "dtype": str(self.loaded.dtype).removeprefix("torch."),
                "versions": self._versions,
                "styles": styles,
                "sampler": self.default_sampler
                if recipe.sampler == DEFAULT_SAMPLER
                else recipe.sampler,
            }
        )

    def warm_up_sizes(self) -> list[tuple[int, int]]:
        """The native size; compiled, every size an ``--ar`` choice produces."""
        if not self.compile_plan.enabled:
            return [size_for(None, self.family)]
        sizes = [size_for(ratio, self.family) for ratio in ASPECT_RATIOS]
        return list(dict.fromkeys(sizes))

    def warm_up(
        self, sizes: Sequence[tuple[int, int]] | None = None, count: int | None = None
    ) -> float:
        """Single-step images before the first user's job: kernels chosen, memory taken
        and, compiled, one graph per size, for a grid and for a full batch of jobs.
        Returns the seconds it took."""
        started = time.perf_counter()
        graphs = compiled_graphs()
        sizes = sizes or self.warm_up_sizes()
        counts = [count or (WARM_UP_COUNT if self.compile_plan.enabled else 1)]
        if count is None and self.compile_plan.enabled and self.max_batch > WARM_UP_COUNT:
            counts.append(self.max_batch)
        styled_path = getattr(self.loras, "styled_path", None)
        paths = [nullcontext, styled_path] if styled_path is not None else [nullcontext]
        runs = [(size, path, count) for size in sizes for path in paths for count in counts]
        for (width, height), path, count in runs:
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        if self.compile_plan.enabled:
            mark_warm()
        log.info(
            "compile %s; warmed up %d run(s) of %s image(s) in %.1fs, %d graph(s) compiled",
            self.compile_plan.reason,
            len(runs),
            " or ".join(map(str, counts)),
            seconds,
            compiled_graphs() - graphs,
        )
        return seconds

    def txt2img(
        self,
        recipe: Recipe,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[GeneratedImage]:
        """``recipe.count`` images in one batched call."""
        size = {"width": recipe.width, "height": recipe.height}
        return self._run(self.pipe, recipe, size, progress, cancel)

    def txt2img_batch(
        self,
        recipes: Sequence[Recipe],
        *,
        progress: Sequence[ProgressCallback | None] = (),
        cancel: Sequence[CancelToken | None] = (),
    ) -> list[list[GeneratedImage]]:
        """The images of several recipes in one batched call, each as :meth:`txt2img` makes
        it alone (its own generator per image). The recipes share what
        :func:`storage.scheduling.batch_key` says; prompts, negatives, seeds and counts may
        differ. ``progress[j]`` and ``cancel[j]`` are recipe *j*'s: the call stops when
        every recipe is cancelled; the caller discards the images of a cancelled one."""
        progress = list(progress) or [None] * len(recipes)
        cancel = list(cancel) or [None] * len(recipes)
        if len(recipes) == 1:
            return [self.txt2img(recipes[0], progress=progress[0], cancel=cancel[0])]
        if all(token is not None and token.cancelled for token in cancel):
            raise GenerationCancelled()
        first = recipes[0]
        self._apply_styles(first)  # one style set for all: its LoRAs once
        sampler = self._use_scheduler(self.pipe, first.sampler)
        prompts: list[str] = []
        negatives: list[str] = []
        generators: list[torch.Generator] = []
        for recipe in recipes:
            prompt, negative = self._styled_prompts(recipe)
            prompts += [prompt] * recipe.count
            negatives += [negative] * recipe.count
            generators += [
                torch.Generator("cpu").manual_seed(recipe.seed_for(i)) for i in range(recipe.count)
            ]
        if any(negatives) and not all(negatives):
            raise ValueError("jobs of one batch either all have a negative prompt or none")
        starts = [sum(recipe.count for recipe in recipes[:j]) for j in range(len(recipes))]
        steps = [
            (token, self._step_callback(each, None, first=start))
            for each, token, start in zip(progress, cancel, starts, strict=True)
        ]

        def on_step_end(pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if all(token is not None and token.cancelled for token in cancel):
                raise GenerationCancelled()
            for token, each in steps:
                if token is None or not token.cancelled:
                    tensors = each(pipe, step, t, tensors)
            return tensors

        result = self.pipe(
            prompt=prompts,
            negative_prompt=negatives if all(negatives) else None,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=generators,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
            width=first.width,
            height=first.height,
        )
        return [
            self._generated(recipe, result.images[start : start + recipe.count], sampler)
            for recipe, start in zip(recipes, starts, strict=True)
        ]

    def img2img(
        self,
        recipe: Recipe,
        source: Image.Image,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[GeneratedImage]:
        """Variations of ``source`` at ``recipe.strength``, in one batched call."""
        if recipe.strength is None:
            raise ImagineError("A variation needs a strength between 0 and 1.")
        image = source.convert("RGB").resize(
            (recipe.width, recipe.height), Image.Resampling.LANCZOS
        )
        extra = {"image": image, "strength": recipe.strength}
        return self._run(self.img2img_pipe, _at_least_one_step(recipe), extra, progress, cancel)

    def upscale(
        self,
        recipe: Recipe,
        source: Image.Image,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GeneratedImage:
        """``source`` at ``recipe.scale`` × its size.

        With a dedicated upscaler its output is fitted to the exact size; otherwise a
        Lanczos resize gets a tiled img2img detail pass from the loaded model.
        """
        scale = recipe.scale or 2
        target = (source.width * scale, source.height * scale)
        if self.upscaler is not None:
            return self._dedicated_upscale(recipe, source, target, progress, cancel)
        resized = source.convert("RGB").resize(target, Image.Resampling.LANCZOS)
        strength = recipe.strength or UPSCALE_STRENGTH
        recipe = _at_least_one_step(
            recipe.model_copy(
                update={"count": 1, "strength": strength, "width": target[0], "height": target[1]}
            )
        )
        tiles = list(_tiles(target, self.upscale_tile))
        canvas = np.zeros((target[1], target[0], 3), dtype=np.float64)
        weight = np.zeros((target[1], target[0], 1), dtype=np.float64)
        overlap = max(8, int(self.upscale_tile * UPSCALE_OVERLAP))
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
                {"image": tile, "strength": strength},
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
        png = encode_png(image, final, self.a1111_sampler(final.sampler))
        return GeneratedImage(0, recipe.seed, image, png, final)

    def _run(
        self,
        pipe: Pipeline,
        recipe: Recipe,
        extra: dict[str, Any],
        progress: ProgressCallback | None,
        cancel: CancelToken | None,
        *,
        encode: bool = True,
    ) -> list[GeneratedImage]:
        if cancel is not None and cancel.cancelled:
            raise GenerationCancelled()
        prompt, negative = self._apply_styles(recipe)
        sampler = self._use_scheduler(pipe, recipe.sampler)
        generators = [
            torch.Generator("cpu").manual_seed(recipe.seed_for(i)) for i in range(recipe.count)
        ]
        result = pipe(
            prompt=prompt,
            negative_prompt=negative or None,
            num_images_per_prompt=recipe.count,
            num_inference_steps=recipe.steps,
            guidance_scale=recipe.guidance,
            generator=generators,
            callback_on_step_end=self._step_callback(progress, cancel),
            callback_on_step_end_tensor_inputs=["latents"],
            **extra,
        )
        return self._generated(recipe, result.images, sampler, encode=encode)

    def _generated(
        self, recipe: Recipe, images: list[Image.Image], sampler: str, *, encode: bool = True
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
            GeneratedImage(index, own.seed, image, png, own)
            for index, (image, own, png) in enumerate(zip(images, owns, pngs, strict=True))
        ]

    def _styled_prompts(self, recipe: Recipe) -> tuple[str, str]:
        """The prompt and negative prompt with the templates of ``recipe``'s styles."""
        prompt, negative = recipe.prompt, recipe.negative_prompt
        for ref in recipe.styles:
            prompt, negative = self.styles.get(ref.name).apply_to_prompt(prompt, negative)
        return prompt, negative

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
    ) -> GeneratedImage:
        if cancel is not None and cancel.cancelled:
            raise GenerationCancelled()
        prompt, negative = recipe.prompt, recipe.negative_prompt
        for ref in recipe.styles:  # their words, not their LoRAs: those fit the base model
            prompt, negative = self.styles.get(ref.name).apply_to_prompt(prompt, negative)
        on_step = self._step_callback(progress, cancel, total=recipe.steps, previews=False)
        upscaler = self.upscaler
        assert upscaler is not None
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
        return GeneratedImage(0, recipe.seed, image, encode_png(image, final, sampler), final)

    def _step_callback(
        self,
        progress: ProgressCallback | None,
        cancel: CancelToken | None,
        *,
        total: int | None = None,
        previews: bool = True,
        first: int = 0,
    ) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
        """Progress (previews of image ``first`` of the batch) and cancel at each step."""
        family = self.family.name if previews else ""
        fixed_total = total
        every = self.preview_every

        def on_step_end(
            pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            if cancel is not None and cancel.cancelled:
                raise GenerationCancelled()
            if progress is not None:
                total = fixed_total or int(getattr(pipe, "num_timesteps", 0) or step + 1)
                done = step + 1
                preview = None
                if supports_preview(family) and (done % every == 0) and done < total:
                    preview = preview_bytes(latent_preview(tensors["latents"][first], family))
                progress(Progress(done, total, preview))
            return tensors

        return on_step_end


def _at_least_one_step(recipe: Recipe) -> Recipe:
    # img2img runs int(steps * strength) steps; zero would return the input unchanged.
    strength = recipe.strength or 1.0
    if int(recipe.steps * strength) >= 1:
        return recipe
    return recipe.model_copy(update={"steps": math.ceil(1 / strength)})


def _tiles(size: tuple[int, int], tile: int) -> Sequence[tuple[int, int, int, int]]:
    """Tiles of at most ``tile`` pixels (multiples of 8) covering ``size`` with overlap."""
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
