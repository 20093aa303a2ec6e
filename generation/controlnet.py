"""ControlNets on a resident pipeline: loaded once, kept, and shared through ``from_pipe``.

A ControlNet pipeline (text-to-image, image-to-image or inpainting; SD or SDXL as
diffusers' AutoPipelines pick it, SD3 and FLUX as ``_PIPELINE_CLASSES`` says) is made
with ``from_pipe`` from the engine's own pipeline, so it shares the UNet or transformer,
VAE, text encoders and the style LoRAs loaded into them: base + styles + controls, one
copy of each weight.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    ControlNetModel,
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
)
from PIL import Image

from generation.controls import ControlRegistry, ControlSpec
from generation.loading import ModelSource, Pipeline, model_hash, resolve_folder
from generation.preprocess import Preprocessor, Unchanged, load_preprocessor
from storage.controls import ControlError, ControlRef, check_controls
from storage.families import FAMILIES
from storage.intake import fit_image
from storage.settings import Settings

CONTROLNET_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
_AUTO_PIPELINES = {
    "txt2img": AutoPipelineForText2Image,
    "img2img": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
}
# The argument naming the control map: SD and SDXL's image-to-image pipelines take ``image``
# as input; SD3's and FLUX's pipelines always call the map ``control_image``.
MAP_ARGUMENT = {"txt2img": "image", "img2img": "control_image", "inpaint": "control_image"}
# ModelFamily.controlnet → the ControlNet class loaded for it.
CONTROLNET_CLASSES: dict[str, type[Any]] = {
    "unet": ControlNetModel,
    "sd3": SD3ControlNetModel,
    "flux": FluxControlNetModel,
}


class SeededSD3ControlNetPipeline(StableDiffusion3ControlNetPipeline):
    """SD3's ControlNet pipeline (diffusers 0.42) encodes the map once for the whole batch
    and samples its latents from the global random generator, in one draw: image i's map
    noise would depend on the first image's seed and on i. This one samples each image's
    map latents from a generator of its own seed, so that an image of a grid is its recipe
    run alone (count 1), as a batch that ran out of memory reruns it. The call's
    generators are left as they are, so the noise is the uncontrolled pipeline's."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generator = kwargs.get("generator")
        if generator is None:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        given = generator if isinstance(generator, list) else [generator]
        seeds = [each.initial_seed() for each in given]
        generators: list[torch.Generator] = []  # one call's: a second map continues them
        vae: Any = self.vae  # type: ignore[attr-defined]
        encode = vae.encode

        def encode_per_image(images: torch.Tensor, *rest: Any, **named: Any) -> Any:
            encoded = encode(images, *rest, **named)
            encoded.latent_dist = _SeededMapLatents(encoded.latent_dist, seeds, generators)
            return encoded

        # The pipeline calls ``self.vae.encode(map).latent_dist.sample()`` with no generator;
        # the VAE is shared with the engine's other pipelines, so only for this call.
        vae.encode = encode_per_image
        try:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        finally:
            del vae.encode


class _SeededMapLatents:
    """A batch of maps' latent distribution whose ``sample`` draws row j from image
    j mod n's generator: the pipeline lays out copies of the maps of images 0 … n−1
    (unconditional ones, then conditional ones), and each image draws all its copies at
    once, as it does alone. The generators are made at the first map, where it is."""

    def __init__(
        self, distribution: Any, seeds: Sequence[int], generators: list[torch.Generator]
    ) -> None:
        self.distribution = distribution
        self.seeds = seeds
        self.generators = generators

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        mean: torch.Tensor = self.distribution.mean
        if not self.generators:
            self.generators += [torch.Generator(mean.device).manual_seed(s) for s in self.seeds]
        images = len(self.generators)
        shape = (mean.shape[0] // images, *mean.shape[1:])
        noise = torch.empty_like(mean)
        for number, each in enumerate(self.generators):
            noise[number::images] = torch.randn(
                shape, generator=each, device=mean.device, dtype=mean.dtype
            )
        return mean + self.distribution.std * noise


class _SameNoise:
    """FLUX's ControlNet pipelines encode the map with the call's generators before they
    draw the noise; this draws the noise from the generators as they were at the call, so
    that the noise is the uncontrolled pipeline's (a control at weight 0 changes nothing)."""

    _noise_states: list[torch.Tensor] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generator = kwargs.get("generator")
        generators = generator if isinstance(generator, list) else [generator]
        self._noise_states = [g.get_state() for g in generators if g is not None]
        try:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._noise_states = None

    def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        generator = kwargs.get("generator", args[-2] if len(args) >= 2 else None)
        generators = generator if isinstance(generator, list) else [generator]
        for each, state in zip(generators, self._noise_states or [], strict=False):
            each.set_state(state)
        return super().prepare_latents(*args, **kwargs)  # type: ignore[misc]


class FluxSameNoiseControlNetPipeline(_SameNoise, FluxControlNetPipeline):
    pass


class FluxSameNoiseControlNetImg2ImgPipeline(_SameNoise, FluxControlNetImg2ImgPipeline):
    pass


class FluxSameNoiseControlNetInpaintPipeline(_SameNoise, FluxControlNetInpaintPipeline):
    """Its ``prepare_latents`` (diffusers 0.42) encodes the canvas and then draws the noise,
    and ``prepare_mask_latents`` encodes the masked canvas after it, both with the call's
    generators, as ``FluxInpaintPipeline`` does: from the reset generators they draw what
    the uncontrolled inpainting draws."""


# (ModelFamily.controlnet, kind) → the pipeline class made ``from_pipe``, where the
# AutoPipeline's pick needs replacing.
_PIPELINE_CLASSES: dict[tuple[str, str], Any] = {
    ("sd3", "txt2img"): SeededSD3ControlNetPipeline,
    ("flux", "txt2img"): FluxSameNoiseControlNetPipeline,
    ("flux", "img2img"): FluxSameNoiseControlNetImg2ImgPipeline,
    ("flux", "inpaint"): FluxSameNoiseControlNetInpaintPipeline,
}


class ControlNets:
    """The controls one engine runs: ControlNets and preprocessors loaded on first use and
    kept resident, and one ``from_pipe`` pipeline per kind and set of controls."""

    def __init__(
        self,
        registry: ControlRegistry,
        settings: Settings,
        family: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.family = family
        self._family = FAMILIES[family]
        self.device = device
        self.dtype = dtype
        self._models: dict[str, tuple[ControlNetModel, str]] = {}
        self._preprocessors: dict[str, Preprocessor] = {}
        self._pipelines: dict[tuple[str, tuple[str, ...]], Pipeline] = {}

    def spec(self, kind: str) -> ControlSpec:
        """The control of type ``kind`` for this family, or a sentence naming what there is."""
        return self.registry.find(kind, self.family)

    def model(self, kind: str) -> tuple[ControlNetModel, str]:
        """The ControlNet of ``kind`` and the hash of its weights, loaded once."""
        spec = self.spec(kind)
        if spec.name not in self._models:
            folder = resolve_folder(spec.model, self.settings, CONTROLNET_FILES)
            if not (folder / "diffusion_pytorch_model.safetensors").is_file():
                raise ControlError(
                    f"The {kind} control {spec.name!r} has no diffusion_pytorch_model.safetensors "
                    f"in {folder}; Imagine loads ControlNets as safetensors only (pickles can run "
                    "code)."
                )
            model = (
                CONTROLNET_CLASSES[self._family.controlnet]
                .from_pretrained(str(folder), dtype=self.dtype, use_safetensors=True)
                .to(self.device)
            )
            source = ModelSource(spec.model, "folder", folder)
            self._models[spec.name] = (model, model_hash(source, self.settings.data_dir / "cache"))
        return self._models[spec.name]

    def preprocessor(self, ref: ControlRef) -> Preprocessor:
        if ref.raw:
            return Unchanged()
        spec = self.spec(ref.type)
        if spec.name not in self._preprocessors:
            self._preprocessors[spec.name] = load_preprocessor(spec, self.settings, self.device)
        return self._preprocessors[spec.name]

    def make_map(
        self, ref: ControlRef, source: Image.Image, size: tuple[int, int]
    ) -> tuple[ControlRef, Image.Image]:
        """The map of ``source`` at the generation's ``size``, and ``ref`` naming what made it.
        ``source`` is cropped about its centre to that shape, as an image prompt is, so the
        map lines up with the image prompt when the two are one picture."""
        self.spec(ref.type)  # a control this family lacks is refused before any work
        fitted = fit_image(source.convert("RGB"), *size)
        preprocessor = self.preprocessor(ref)
        made = preprocessor(fitted)
        return ref.model_copy(update={"preprocessor": preprocessor.identity}), made

    def complete(self, ref: ControlRef) -> ControlRef:
        """``ref`` naming the ControlNet that runs it and its hash."""
        _, weights = self.model(ref.type)
        return ref.model_copy(update={"model": self.spec(ref.type).name, "model_hash": weights})

    def check_kind(self, kind: str) -> None:
        """Refuse, with a sentence, a control on a ``kind`` of generation that diffusers has
        no ControlNet pipeline for in this family."""
        refusal = self._family.control_refusal(kind)
        if refusal is not None:
            raise ControlError(refusal)

    def pipeline(self, base: Pipeline, kind: str, controls: Sequence[ControlRef]) -> Pipeline:
        """The ``kind`` pipeline running ``controls``, made once from ``base`` and kept."""
        self.check_kind(kind)
        check_controls(tuple(controls))
        names = tuple(self.spec(ref.type).name for ref in controls)
        key = (kind, names)
        if key not in self._pipelines:
            models = [self.model(ref.type)[0] for ref in controls]
            controlnet: Any = models[0] if len(models) == 1 else models
            maker = _PIPELINE_CLASSES.get((self._family.controlnet, kind), _AUTO_PIPELINES[kind])
            pipe = maker.from_pipe(base, controlnet=controlnet)
            pipe.set_progress_bar_config(disable=True)
            self._pipelines[key] = pipe
        return self._pipelines[key]

    def arguments(
        self,
        kind: str,
        controls: Sequence[ControlRef],
        maps: Sequence[Image.Image],
        size: tuple[int, int],
    ) -> dict[str, Any]:
        """The pipeline call's control arguments: maps, weights and windows."""
        self.check_kind(kind)
        if len(maps) != len(controls):
            raise ControlError(
                f"{len(controls)} control(s) need as many maps; {len(maps)} were given."
            )
        images = [image.convert("RGB").resize(size, Image.Resampling.LANCZOS) for image in maps]
        one = len(controls) == 1

        def each(values: list[Any]) -> Any:
            return values[0] if one else values

        return {
            self._map_argument(kind): each(images),
            "controlnet_conditioning_scale": each([ref.weight for ref in controls]),
            "control_guidance_start": each([ref.start for ref in controls]),
            "control_guidance_end": each([ref.end for ref in controls]),
        }

    def _map_argument(self, kind: str) -> str:
        return MAP_ARGUMENT[kind] if self._family.controlnet == "unet" else "control_image"


def map_png(image: Image.Image) -> bytes:
    """A control map as the PNG stored in the blob store (same pixels, same bytes)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
