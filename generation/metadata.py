"""Images that carry their recipe: an A1111 ``parameters`` chunk and our JSON chunk.

The ``parameters`` text is what AUTOMATIC1111, Civitai and most tools read;
the ``imagine`` chunk holds the full :class:`Recipe` as JSON.
"""

from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from storage.controls import ControlRef
from storage.errors import ImagineError
from storage.recipe import Recipe
from storage.samplers import a1111_sampler

RECIPE_CHUNK = "imagine"
# sd-webui-controlnet's "Module" names for what each control type's preprocessor does.
A1111_CONTROL_MODULES = {
    "canny": "canny",
    "depth": "depth_midas",
    "pose": "openpose",
    "lineart": "lineart_standard",
    "scribble": "scribble_xdog",
    "tile": "tile_resample",
}


def a1111_control(control: ControlRef) -> str:
    """One control as sd-webui-controlnet writes it in ``parameters`` (``ControlNet N:``)."""
    module = "none" if control.raw else A1111_CONTROL_MODULES[control.type]
    model = control.model or control.type
    if control.model_hash:
        model += f" [{control.model_hash}]"
    fields = [
        f"Module: {module}",
        f"Model: {model}",
        f"Weight: {control.weight:g}",
        "Resize Mode: Crop and Resize",  # the source is cropped to the shape (make_map)
        f"Guidance Start: {control.start:g}",
        f"Guidance End: {control.end:g}",
        "Control Mode: Balanced",
    ]
    return '"' + ", ".join(fields) + '"'


def a1111_parameters(recipe: Recipe, sampler: str | None = None) -> str:
    """The recipe in AUTOMATIC1111's ``parameters`` format.

    ``sampler`` is A1111's name of the scheduler that ran, where the engine knows better
    than the recipe (a dedicated upscaler's own scheduler, a model default off the list);
    otherwise the recipe's listed sampler gives it.
    """
    fields = [
        f"Steps: {recipe.steps}",
        f"Sampler: {sampler or a1111_sampler(recipe.sampler) or recipe.sampler}",
        f"CFG scale: {recipe.guidance:g}",
        f"Seed: {recipe.seed}",
        f"Size: {recipe.width}x{recipe.height}",
    ]
    if recipe.model_hash:
        fields.append(f"Model hash: {recipe.model_hash}")
    fields.append(f"Model: {recipe.model}")
    if recipe.quantization:  # Forge's field for weights run in fewer bits
        fields.append(f"Diffusion in Low Bits: {recipe.quantization}")
    if recipe.strength is not None:
        fields.append(f"Denoising strength: {recipe.strength:g}")
    if recipe.init_image is not None:
        fields.append(f"Init image hash: {recipe.init_image.sha256[:12]}")
        fields.append(f"Image weight: {recipe.image_weight:g}")
    if recipe.styles:
        hashes = ", ".join(f"{s.name}: {(s.sha256 or '')[:12]}" for s in recipe.styles)
        fields.append(f'Lora hashes: "{hashes}"')
    for number, control in enumerate(recipe.controls):
        fields.append(f"ControlNet {number}: {a1111_control(control)}")
    if "imagine" in recipe.versions:
        fields.append(f"Version: imagine {recipe.versions['imagine']}")
    prompt = recipe.prompt
    for style in recipe.styles:
        prompt += f" <lora:{style.name}:{style.weight:g}>"
    lines = [prompt]
    if recipe.negative_prompt:
        lines.append(f"Negative prompt: {recipe.negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def encode_png(image: Image.Image, recipe: Recipe, sampler: str | None = None) -> bytes:
    """PNG bytes with the recipe embedded; the same pixels and recipe give the same bytes."""
    info = PngInfo()
    info.add_itxt("parameters", a1111_parameters(recipe, sampler))
    info.add_itxt(RECIPE_CHUNK, recipe.to_json())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()


def read_recipe(data: bytes) -> Recipe:
    """The recipe embedded in a PNG made by Imagine."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            text = image.info.get(RECIPE_CHUNK)
    except OSError:
        raise ImagineError("That file is not an image Imagine can read.") from None
    if not isinstance(text, str):
        raise ImagineError(
            "That image carries no Imagine recipe (Discord's media proxy strips it; "
            "use the original file)."
        )
    return Recipe.from_json(text)
