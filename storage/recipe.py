"""The one schema of "everything needed to reproduce a generation"."""

from __future__ import annotations

import difflib
import secrets
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from storage.controls import MAX_CONTROLS, ControlRef
from storage.families import FAMILIES, ModelFamily

MAX_SEED = 2**32 - 1
MAX_IMAGE_WEIGHT = 2.0

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


# -- seeds: every seed Imagine computes comes from these three ----------------------------------


def random_seed() -> int:
    """A fresh seed from the whole range: a prompt without --seed, a reroll, new variations."""
    return secrets.randbelow(MAX_SEED + 1)


def offset_seed(seed: int, offset: int) -> int:
    """``seed + offset``, wrapping at the top of the range."""
    return (seed + offset) % (MAX_SEED + 1)


def repeat_seed(seed: int, run: int, count: int) -> int:
    """The seed of run ``run`` of ``--repeat``: past the ``count`` images of every earlier run,
    so no image of one run shares its seed with an image of another."""
    return offset_seed(seed, run * count)


class StyleRef(BaseModel):
    """One style applied to a generation, with the weight it was applied at."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    weight: float = Field(ge=-4.0, le=4.0)
    sha256: str | None = Field(
        default=None, description="Hash of the LoRA file, filled in when the style is applied."
    )


MAX_SIDE = 4096  # pixels: the largest width or height a recipe may ask for
# Validation context of a recipe read back as it was made (stored, or a PNG's).
_AS_MADE = {"as_made": True}


class Outpaint(BaseModel):
    """Zoom Out and Pan: pixels added on each side of the source image.

    The canvas is the source plus these margins (the recipe's width and height); the mask
    is the new area plus ``overlap`` pixels into the source, which the model sees painted
    over so the new area continues it; the source's own pixels are put back unchanged.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    left: int = Field(ge=0)
    top: int = Field(ge=0)
    right: int = Field(ge=0)
    bottom: int = Field(ge=0)
    overlap: int = Field(default=8, ge=0, le=64)
    action: str = Field(
        default="", description="What the member asked for: zoom 1.5, zoom 2, pan left, ..."
    )


class ImageRef(BaseModel):
    """An image a recipe starts from, as stored: a normalised PNG in the blob store
    (see :mod:`storage.intake`), named by its key and the sha256 of its bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    blob_key: Sha256
    sha256: Sha256
    width: int = Field(ge=1, le=16384)
    height: int = Field(ge=1, le=16384)


class Recipe(BaseModel):
    """A generation's full recipe: same recipe, same hardware, same pixels.

    Image *i* of a generation uses seed ``seed + i`` (modulo 2**32) on its own
    CPU ``torch.Generator``, so it can be regenerated alone.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, description="Hub id, local folder, checkpoint file or 'tiny'.")
    model_hash: str | None = Field(default=None, description="Hash identifying the weights used.")
    model_family: str | None = Field(default=None, description="sd15, sd2, sdxl, sd3, flux, ...")
    prompt: str
    negative_prompt: str = ""
    seed: Seed
    width: int = Field(ge=64, le=MAX_SIDE, multiple_of=8)
    height: int = Field(ge=64, le=MAX_SIDE, multiple_of=8)
    aspect_ratio: str | None = Field(default=None, description="The --ar the user asked for.")
    steps: int = Field(ge=1, le=200)
    guidance: float = Field(ge=0.0, le=50.0)
    sampler: str = Field(default="default", min_length=1)
    count: int = Field(default=4, ge=1, le=16, description="Images the generation produces.")
    styles: tuple[StyleRef, ...] = ()
    strength: float | None = Field(
        default=None, gt=0.0, le=1.0, description="img2img strength for variations and upscales."
    )
    source_image_id: int | None = Field(
        default=None, description="The image a variation or upscale starts from."
    )
    scale: int | None = Field(default=None, ge=2, le=4, description="Upscale factor.")
    outpaint: Outpaint | None = Field(
        default=None, description="Zoom Out / Pan: margins added around the source image."
    )
    init_image: ImageRef | None = Field(
        default=None, description="The image prompt img2img starts from (the uploaded image)."
    )
    image_weight: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_IMAGE_WEIGHT,
        description="--iw: how strongly the image prompt steers (storage.derive maps it to "
        "the strength).",
    )
    controls: tuple[ControlRef, ...] = Field(default=(), max_length=MAX_CONTROLS)
    dtype: str | None = None
    quantization: str | None = Field(
        default=None,
        description="Weight quantisation the model ran with (int8, float8); None: its dtype.",
    )
    versions: dict[str, str] = Field(
        default_factory=dict, description="Library versions the generation ran with."
    )

    @property
    def family(self) -> ModelFamily | None:
        """The family the recipe names (``model_family``), if it is a known one."""
        return FAMILIES.get(self.model_family or "")

    @model_validator(mode="after")
    def _sides_fit_the_family(self, info: ValidationInfo) -> Recipe:
        # A recipe read back is taken as made: rows from before a family's size step was
        # checked still load, and the engine refuses one it cannot make with a sentence.
        family = self.family
        if family is None or (info.context or {}).get("as_made"):
            return self
        refusal = family.size_refusal(self.width, self.height)
        if refusal is not None:
            raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _image_prompt_is_whole(self) -> Recipe:
        if (self.init_image is None) != (self.image_weight is None):
            raise ValueError("an image prompt needs both init_image and image_weight")
        if self.init_image is not None and self.strength is None:
            raise ValueError("an image prompt needs its strength")
        return self

    def seed_for(self, index: int) -> int:
        """The seed of image ``index`` of this generation."""
        return offset_seed(self.seed, index)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Recipe:
        """A recipe read back from JSON (a PNG's), as it was made."""
        return cls.model_validate_json(text, context=_AS_MADE)

    @classmethod
    def as_made(cls, value: Any) -> Recipe:
        """A recipe read back from its stored form (:meth:`model_dump`), as it was made."""
        return cls.model_validate(value, context=_AS_MADE)


def unknown_style_message(name: str, known: Iterable[str]) -> tuple[str, list[str]]:
    """The sentence refusing an unknown style name, and the closest known names."""
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        hint = "did you mean " + " or ".join(close) + "?"
    elif names:
        hint = "available styles: " + ", ".join(names[:10]) + (", …" if len(names) > 10 else ".")
    else:
        hint = "no styles are installed yet."
    shown = shortened(name, 64)  # a real name has at most 64
    return f"There is no style {shown!r}; {hint}", close


def shortened(text: str, limit: int) -> str:
    """``text`` as a sentence quotes it: at most ``limit`` characters, "..." where cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def search_names(names: Iterable[str], text: str, limit: int = 25) -> list[str]:
    """Names for autocomplete: prefix matches first, then substring, then fuzzy."""
    names = sorted(names)
    needle = text.lower().strip()
    if not needle:
        return names[:limit]
    prefix = [n for n in names if n.lower().startswith(needle)]
    inside = [n for n in names if needle in n.lower() and n not in prefix]
    fuzzy = [
        n
        for n in difflib.get_close_matches(needle, names, n=limit, cutoff=0.6)
        if n not in prefix and n not in inside
    ]
    return (prefix + inside + fuzzy)[:limit]
