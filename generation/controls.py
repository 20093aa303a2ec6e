"""ControlNets: which model serves each control type for each model family, from TOML files.

Torch-free, like :mod:`generation.styles`: the bot can say which controls the running
family offers, and refuse one it lacks, without loading any model. A control file,
``canny-sd15.toml``::

    name = "canny-sd15"
    type = "canny"                              # canny, depth, pose, lineart, scribble, tile
    model = "lllyasviel/control_v11p_sd15_canny"  # hub id, or a diffusers folder
    family = "sd15"

    [preprocessor]                              # optional; see PREPROCESSOR_OPTIONS
    low_threshold = 100
    high_threshold = 200
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.controls import CONTROL_TYPES, ControlError
from storage.families import FAMILIES, base_family

CONTROL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# Each type's preprocessor settings and their defaults (``model`` is a hub id or folder).
PREPROCESSOR_OPTIONS: dict[str, dict[str, Any]] = {
    "canny": {"low_threshold": 100, "high_threshold": 200},
    "scribble": {"threshold": 32},
    "lineart": {},
    "tile": {},
    "depth": {"model": "Intel/dpt-hybrid-midas"},
    "pose": {"model": "usyd-community/vitpose-base-simple", "keypoint_threshold": 0.3},
}


@dataclass(frozen=True)
class ControlSpec:
    name: str
    type: str
    model: str  # a hub id, or the absolute path of a diffusers folder
    family: str
    preprocessor: dict[str, Any]  # PREPROCESSOR_OPTIONS of the type, as the file sets them
    source: Path


def _model_location(value: str, folder: Path) -> str:
    beside = folder / value
    if value.startswith((".", "/", "~")) or beside.exists():
        return str((folder / Path(value).expanduser()).resolve())
    return value


def _preprocessor(data: Any, kind: str, source: Path) -> dict[str, Any]:
    options = dict(PREPROCESSOR_OPTIONS[kind])
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ControlError(f"{source.name}: [preprocessor] must be a table of settings.")
    for key, value in data.items():
        if key not in options:
            known = ", ".join(options) or "none"
            raise ControlError(
                f"{source.name}: the {kind} preprocessor has no setting {key!r} (it has {known})."
            )
        default = options[key]
        if isinstance(default, str):
            if not isinstance(value, str) or not value:
                raise ControlError(f"{source.name}: preprocessor {key} must be text.")
            value = _model_location(value, source.parent) if key == "model" else value
        elif not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ControlError(f"{source.name}: preprocessor {key} must be a number from 0.")
        options[key] = value
    return options


def parse_control(source: Path) -> ControlSpec:
    """Read and check one control file; every problem names the file and the fix."""
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ControlError(f"{source.name} is not a readable TOML file ({exc}).") from None
    name = data.get("name", source.stem)
    if not isinstance(name, str) or not CONTROL_NAME.fullmatch(name):
        raise ControlError(
            f"{source.name}: control name {name!r} must be 1 to 64 letters, digits, ., - or _."
        )
    kind = data.get("type")
    if kind not in CONTROL_TYPES:
        kinds = ", ".join(CONTROL_TYPES)
        raise ControlError(f"{source.name}: type {kind!r} is not one of {kinds}.")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ControlError(
            f"{source.name}: set model to the ControlNet's hub id or diffusers folder."
        )
    family = data.get("family")
    if family not in FAMILIES:
        raise ControlError(f"{source.name}: family {family!r} is not one of {', '.join(FAMILIES)}.")
    return ControlSpec(
        name=name,
        type=kind,
        model=_model_location(model, source.parent),
        family=family,
        preprocessor=_preprocessor(data.get("preprocessor"), kind, source),
        source=source,
    )


class ControlRegistry:
    """The controls of a folder. Invalid files are skipped and listed in ``problems``."""

    def __init__(self, controls: Iterable[ControlSpec] = (), problems: Iterable[str] = ()) -> None:
        self._controls = {control.name: control for control in controls}
        self.problems = list(problems)

    @classmethod
    def from_folder(cls, folder: Path) -> ControlRegistry:
        controls: dict[str, ControlSpec] = {}
        served: dict[tuple[str, str], str] = {}
        problems: list[str] = []
        for source in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                control = parse_control(source)
            except ControlError as exc:
                problems.append(str(exc))
                continue
            taken = controls.get(control.name) or controls.get(
                served.get((control.type, control.family), "")
            )
            if taken is not None:
                problems.append(
                    f"{source.name}: {taken.source.name} already declares {control.name!r} or "
                    f"the {control.type} control of {control.family}; remove one of them."
                )
                continue
            controls[control.name] = control
            served[(control.type, control.family)] = control.name
        return cls(controls.values(), problems)

    def names(self) -> list[str]:
        return sorted(self._controls)

    def _serving(self, family: str) -> list[ControlSpec]:
        """The controls ``family`` can run: its own first, then its base family's (a FLUX.1
        dev ControlNet runs on schnell, an SD 3.5 Large one on Large Turbo)."""
        base, controls = base_family(family), list(self._controls.values())
        own = [c for c in controls if c.family == family]
        return own + [c for c in controls if base != family and c.family == base]

    def types_for(self, family: str) -> list[str]:
        """The control types the ``family`` can run, in the order of ``CONTROL_TYPES``."""
        kinds = {c.type for c in self._serving(family)}
        return [kind for kind in CONTROL_TYPES if kind in kinds]

    def find(self, kind: str, family: str) -> ControlSpec:
        """The control of type ``kind`` for ``family`` (or its base family), or a sentence
        naming what there is."""
        for control in self._serving(family):
            if control.type == kind:
                return control
        offered = self.types_for(family)
        here = (
            f"controls for {family} models here: {', '.join(offered)}."
            if offered
            else f"no controls are installed for {family} models."
        )
        elsewhere = sorted({c.family for c in self._controls.values() if c.type == kind})
        hint = f" ({kind} is installed for {', '.join(elsewhere)}.)" if elsewhere else ""
        raise ControlError(f"There is no {kind} control for {family} models; {here}{hint}")

    def __len__(self) -> int:
        return len(self._controls)
