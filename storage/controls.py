"""ControlNet inputs as a recipe records them, and the sentences refusing bad ones.

Torch-free: the prompt parser checks ``--control``, ``--cw``, ``--cstart`` and ``--cend``
here before anything is queued; the engine checks again before it runs.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import ImagineError

CONTROL_TYPES = ("canny", "depth", "pose", "lineart", "scribble", "tile")
MAX_CONTROLS = 2
MAX_CONTROL_WEIGHT = 2.0

BlobKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ControlError(ImagineError):
    """A control cannot be used as asked; the message says what to change."""


def control_type_problem(kind: str) -> str | None:
    if kind in CONTROL_TYPES:
        return None
    return f"--control {kind} is not a control type; use {', '.join(CONTROL_TYPES)}."


def control_weight_problem(weight: float) -> str | None:
    if 0.0 <= weight <= MAX_CONTROL_WEIGHT:
        return None
    return f"--cw {weight:g} is out of range; a control's weight goes from 0 to 2 (default 1)."


def control_window_problem(start: float, end: float) -> str | None:
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        return (
            f"--cstart {start:g} and --cend {end:g} must be between 0 and 1: "
            "the fractions of the steps where the control starts and stops steering."
        )
    if start >= end:
        return (
            f"--cstart {start:g} must be below --cend {end:g}: the control steers from the "
            "first to the second, as fractions of the steps (0 to 1)."
        )
    return None


def control_count_problem(count: int) -> str | None:
    if count <= MAX_CONTROLS:
        return None
    return f"At most {MAX_CONTROLS} controls can steer one image; {count} were asked for."


class ControlRef(BaseModel):
    """One ControlNet input of a generation: enough to run it again to the same pixels.

    ``source_key`` is the uploaded image; ``map_key`` the map the ControlNet saw, made by
    ``preprocessor`` from the source (or the source itself, ``raw``). Both are blob keys,
    which are the sha256 of the blobs' bytes. A queued recipe may lack the map: the worker
    makes it, stores it and fills in ``map_key``, ``preprocessor``, ``model`` and
    ``model_hash``; from then on the stored map is used, never made again.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    weight: float = Field(default=1.0, ge=0.0, le=MAX_CONTROL_WEIGHT)
    start: float = Field(default=0.0, ge=0.0, le=1.0)
    end: float = Field(default=1.0, ge=0.0, le=1.0)
    raw: bool = Field(default=False, description="The source is already a map: no preprocessor.")
    source_key: BlobKey | None = None
    map_key: BlobKey | None = None
    preprocessor: str | None = Field(default=None, description="What made the map, and version.")
    model: str | None = Field(default=None, description="The ControlNet that ran (its entry).")
    model_hash: str | None = None

    @model_validator(mode="after")
    def _checked(self) -> ControlRef:
        problem = control_type_problem(self.type) or control_window_problem(self.start, self.end)
        if problem:
            raise ValueError(problem)
        if self.source_key is None and self.map_key is None:
            raise ValueError("a control needs its source image or its map")
        return self


def make_control(
    kind: str,
    *,
    weight: float = 1.0,
    start: float = 0.0,
    end: float = 1.0,
    raw: bool = False,
    source_key: str,
) -> ControlRef:
    """A control from the user's flags, or :class:`ControlError` with the sentence to show."""
    problem = (
        control_type_problem(kind)
        or control_weight_problem(weight)
        or control_window_problem(start, end)
    )
    if problem:
        raise ControlError(problem)
    return ControlRef(
        type=kind, weight=weight, start=start, end=end, raw=raw, source_key=source_key
    )


def check_controls(controls: tuple[ControlRef, ...]) -> None:
    problem = control_count_problem(len(controls))
    if problem:
        raise ControlError(problem)
