"""Styles: named LoRA recipes read from a folder of TOML files.

This module does not import torch: the bot lists and autocompletes styles
without loading any model. Applying a style's LoRA is the engine's job.

A style file, ``watercolor.toml``::

    name = "watercolor"
    description = "Soft washes of colour on rough paper"
    lora = "watercolor.safetensors"      # beside the TOML file
    default_weight = 0.8
    trigger_words = ["wtrclr"]
    prompt_template = "{prompt}, watercolor painting"
    negative_template = "{negative}, photo"
    base_model_family = "sd15"
    preview = "watercolor.png"           # optional
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.errors import ImagineError, NotFound
from storage.families import FAMILIES
from storage.recipe import StyleRef, search_names, unknown_style_message
from storage.style_store import STYLE_NAME, lora_rank_of


class StyleError(ImagineError):
    """A style file is invalid or a style cannot be applied."""


class UnknownStyle(NotFound):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        message, close = unknown_style_message(name, known)
        super().__init__(message)
        self.name = name
        self.suggestions = close


@dataclass(frozen=True)
class StyleSpec:
    name: str
    description: str
    lora_path: Path
    default_weight: float
    trigger_words: tuple[str, ...]
    prompt_template: str
    negative_template: str
    family: str
    preview_path: Path | None
    source: Path
    _hash: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        if not self._hash:
            self._hash.append(hashlib.sha256(self.lora_path.read_bytes()).hexdigest())
        return self._hash[0]

    def apply_to_prompt(self, prompt: str, negative: str) -> tuple[str, str]:
        prompt = self.prompt_template.replace("{prompt}", prompt)
        missing = [word for word in self.trigger_words if word not in prompt]
        if missing:
            prompt = ", ".join([prompt, *missing])
        negative = self.negative_template.replace("{negative}", negative).strip(" ,")
        return prompt, negative

    def ref(self, weight: float | None = None) -> StyleRef:
        return StyleRef(
            name=self.name,
            weight=self.default_weight if weight is None else weight,
            sha256=self.sha256,
        )


def _text(data: dict[str, Any], key: str, default: str, source: Path) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise StyleError(f"{source.name}: {key} must be text.")
    return value


def parse_style(source: Path) -> StyleSpec:
    """Read and check one style file; every problem names the file and the fix."""
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StyleError(f"{source.name} is not a readable TOML file ({exc}).") from None
    name = _text(data, "name", source.stem, source)
    if not STYLE_NAME.fullmatch(name):
        raise StyleError(
            f"{source.name}: style name {name!r} must be 1 to 64 letters, digits, - or _."
        )
    lora = data.get("lora")
    if not isinstance(lora, str) or not lora:
        raise StyleError(f"{source.name}: set lora to the .safetensors file of the style.")
    lora_path = (source.parent / lora).resolve()
    if lora_path.suffix != ".safetensors":
        raise StyleError(
            f"{source.name}: {lora_path.name} is not a .safetensors file; pickled LoRAs "
            "(.ckpt, .pt, .bin) can run code when loaded, so convert it to .safetensors."
        )
    if not lora_path.is_file():
        raise StyleError(f"{source.name}: the LoRA file {lora_path} does not exist.")
    family = _text(data, "base_model_family", "", source)
    if family not in FAMILIES:
        raise StyleError(
            f"{source.name}: base_model_family {family!r} is not one of {', '.join(FAMILIES)}."
        )
    weight = data.get("default_weight", 1.0)
    if not isinstance(weight, int | float) or not -4 <= weight <= 4:
        raise StyleError(f"{source.name}: default_weight must be a number from -4 to 4.")
    triggers = data.get("trigger_words", [])
    if not isinstance(triggers, list) or not all(isinstance(w, str) for w in triggers):
        raise StyleError(f"{source.name}: trigger_words must be a list of words.")
    prompt_template = _text(data, "prompt_template", "{prompt}", source)
    if "{prompt}" not in prompt_template:
        raise StyleError(f"{source.name}: prompt_template must contain {{prompt}}.")
    negative_template = _text(data, "negative_template", "{negative}", source)
    if "{negative}" not in negative_template:
        raise StyleError(f"{source.name}: negative_template must contain {{negative}}.")
    preview = data.get("preview")
    preview_path = (source.parent / preview).resolve() if isinstance(preview, str) else None
    return StyleSpec(
        name=name,
        description=_text(data, "description", "", source),
        lora_path=lora_path,
        default_weight=float(weight),
        trigger_words=tuple(triggers),
        prompt_template=prompt_template,
        negative_template=negative_template,
        family=family,
        preview_path=preview_path,
        source=source,
    )


class StyleRegistry:
    """The styles of a folder, by name. Invalid files are skipped and listed in ``problems``."""

    def __init__(self, styles: Iterable[StyleSpec] = (), problems: Iterable[str] = ()) -> None:
        self._styles = {style.name: style for style in styles}
        self._own = dict(self._styles)  # as made: what a server's own style only shadows
        self.problems = list(problems)

    @classmethod
    def from_folder(cls, folder: Path) -> StyleRegistry:
        styles: dict[str, StyleSpec] = {}
        problems: list[str] = []
        for source in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                style = parse_style(source)
            except StyleError as exc:
                problems.append(str(exc))
                continue
            if style.name in styles:
                problems.append(
                    f"{source.name}: the name {style.name!r} is already used by "
                    f"{styles[style.name].source.name}; rename one of them."
                )
                continue
            styles[style.name] = style
        return cls(styles.values(), problems)

    def names(self) -> list[str]:
        return sorted(self._styles)

    def default_weights(self) -> dict[str, float]:
        return {name: style.default_weight for name, style in self._styles.items()}

    def put(self, style: StyleSpec) -> None:
        """Add ``style`` for the jobs that follow, shadowing one of the same name: a server's
        own style, for that server's jobs. :meth:`unshadow` brings the registry's back."""
        self._styles[style.name] = style

    def unshadow(self, name: str) -> None:
        """The registry's own style ``name`` again (or none) in place of one :meth:`put`
        there: for a job of a server that has no style of that name (any more)."""
        if name in self._own:
            self._styles[name] = self._own[name]
        else:
            self._styles.pop(name, None)

    def get(self, name: str) -> StyleSpec:
        try:
            return self._styles[name]
        except KeyError:
            raise UnknownStyle(name, self._styles) from None

    def lora_ranks(self) -> list[int]:
        """Each style's LoRA rank, from the files' headers alone (no weights are read);
        a file without a readable header is left out (using it fails with a sentence)."""
        ranks = (lora_rank_of(style.lora_path) for style in self._styles.values())
        return [rank for rank in ranks if rank is not None]

    def search(self, text: str, limit: int = 25) -> list[str]:
        """Names for autocomplete: prefix matches first, then substring, then fuzzy."""
        return search_names(self.names(), text, limit)

    def __len__(self) -> int:
        return len(self._styles)
