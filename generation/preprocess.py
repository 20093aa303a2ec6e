"""Preprocessors: a photo in, the map a ControlNet reads out (edges, depth, a pose skeleton).

Canny, scribble, lineart and tile need no model (OpenCV); depth runs a transformers
depth-estimation model (DPT), pose a transformers VitPose keypoint model drawn as an
OpenPose skeleton. Every preprocessor names itself for the recipe (``identity``: what
made the map, with the library's version or the weights' hash).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from PIL import Image

from generation.controls import ControlSpec
from generation.loading import ModelSource, model_hash, resolve_folder
from storage.controls import ControlError
from storage.settings import Settings

_PREPROCESSOR_FILES = ["*.json", "*.safetensors", "*.txt"]

Pixels = np.ndarray[Any, np.dtype[np.uint8]]


class Preprocessor(Protocol):
    @property
    def identity(self) -> str:
        """What makes the map, for the recipe: name, settings, library version or weights."""
        ...

    def __call__(self, image: Image.Image) -> Image.Image:
        """The map of ``image``, RGB, at the size of ``image``."""
        ...


def _rgb(image: Image.Image) -> Pixels:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _opencv(name: str) -> str:
    return f"opencv-{cv2.__version__}:{name}"


@dataclass(frozen=True)
class Canny:
    low: int = 100
    high: int = 200

    @property
    def identity(self) -> str:
        return _opencv(f"canny({self.low},{self.high})")

    def __call__(self, image: Image.Image) -> Image.Image:
        edges = cv2.Canny(_rgb(image), self.low, self.high)
        return Image.fromarray(edges).convert("RGB")


@dataclass(frozen=True)
class Scribble:
    """sd-webui-controlnet's ``scribble_xdog``: a difference of Gaussians, thresholded."""

    threshold: int = 32

    @property
    def identity(self) -> str:
        return _opencv(f"scribble_xdog({self.threshold})")

    def __call__(self, image: Image.Image) -> Image.Image:
        pixels = _rgb(image).astype(np.float32)
        fine = cv2.GaussianBlur(pixels, (0, 0), 0.5)
        coarse = cv2.GaussianBlur(pixels, (0, 0), 5.0)
        dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255)
        lines = np.zeros(dog.shape, dtype=np.uint8)
        lines[2 * (255 - dog) > self.threshold] = 255
        return Image.fromarray(lines).convert("RGB")


@dataclass(frozen=True)
class Lineart:
    """sd-webui-controlnet's ``lineart_standard``: dark strokes as white lines, no model."""

    @property
    def identity(self) -> str:
        return _opencv("lineart_standard(6)")

    def __call__(self, image: Image.Image) -> Image.Image:
        pixels = _rgb(image).astype(np.float32)
        blurred = cv2.GaussianBlur(pixels, (0, 0), 6.0)
        intensity = np.min(blurred - pixels, axis=2).clip(0, 255)
        strong = intensity[intensity > 8]
        intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
        intensity *= 127
        return Image.fromarray(intensity.clip(0, 255).astype(np.uint8)).convert("RGB")


@dataclass(frozen=True)
class Unchanged:
    """The image itself: ``raw`` maps brought by the user, and the tile control's input."""

    identity: str = "raw"

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")


def _weights_hash(folder: Path, settings: Settings) -> str:
    return model_hash(ModelSource(str(folder), "folder", folder), settings.data_dir / "cache")


class Depth:
    """Relative depth from a transformers depth-estimation model: near is bright."""

    def __init__(self, model: str, folder: Path, weights: str, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.processor = AutoImageProcessor.from_pretrained(str(folder))
        self.model = AutoModelForDepthEstimation.from_pretrained(
            str(folder), use_safetensors=True
        ).to(device)
        self.model.eval()
        self.device = device
        self.identity = f"{type(self.model).__name__}:{model}@{weights}"

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> Image.Image:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        depth = self.model(**inputs).predicted_depth.float()
        depth = torch.nn.functional.interpolate(
            depth[:, None], size=(image.height, image.width), mode="bicubic", align_corners=False
        )[0, 0]
        low, span = depth.min(), depth.max() - depth.min()
        scaled = (depth - low) / span * 255 if span > 0 else torch.zeros_like(depth)
        gray = scaled.round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        return Image.fromarray(gray).convert("RGB")


COCO_KEYPOINTS = 17
# OpenPose's 18 body points from COCO's 17 (VitPose); -1 is the neck, between the shoulders.
_OPENPOSE_FROM_COCO = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip


def draw_openpose(
    size: tuple[int, int], points: list[tuple[float, float] | None], stick: int = 4
) -> Image.Image:
    """OpenPose's body drawing (as ControlNet's openpose models were trained on): coloured
    limbs as ellipses, then the joints, on black. ``points`` are the 18 OpenPose points."""
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for number, (a, b) in enumerate(_LIMBS):
        first, second = points[a], points[b]
        if first is None or second is None:
            continue
        (x1, y1), (x2, y2) = first, second
        length = float(np.hypot(x1 - x2, y1 - y2))
        angle = int(np.degrees(np.arctan2(y1 - y2, x1 - x2)))
        centre = (int((x1 + x2) / 2), int((y1 + y2) / 2))
        outline = cv2.ellipse2Poly(centre, (int(length / 2), stick), angle, 0, 360, 1)
        polygon: Any = np.asarray(outline, dtype=np.int32)
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in _COLOURS[number]])
    for number, point in enumerate(points):
        if point is not None:
            cv2.circle(canvas, (int(point[0]), int(point[1])), stick, _COLOURS[number], -1)
    return Image.fromarray(canvas)


class Pose:
    """A pose skeleton from a transformers VitPose model, the whole picture as one person."""

    def __init__(
        self,
        model: str,
        folder: Path,
        weights: str,
        device: torch.device,
        keypoint_threshold: float,
    ) -> None:
        from transformers import VitPoseForPoseEstimation

        loaded: Any = VitPoseForPoseEstimation.from_pretrained(str(folder), use_safetensors=True)
        self.model = loaded.to(device)
        self.model.eval()
        self.device = device
        self.threshold = keypoint_threshold
        # Read rather than through VitPoseImageProcessor, whose box warping needs scipy.
        config = json.loads((folder / "preprocessor_config.json").read_text())
        self.input_size = (config["size"]["width"], config["size"]["height"])
        self.mean = np.array(config.get("image_mean", [0.485, 0.456, 0.406]), dtype=np.float32)
        self.std = np.array(config.get("image_std", [0.229, 0.224, 0.225]), dtype=np.float32)
        self.identity = (
            f"{type(self.model).__name__}:{model}@{weights}+openpose({keypoint_threshold:g})"
        )

    @torch.inference_mode()
    def keypoints(self, image: Image.Image) -> list[tuple[float, float, float]]:
        """COCO's 17 points as (x, y, score) in the pixels of ``image``."""
        resized = image.convert("RGB").resize(self.input_size, Image.Resampling.BILINEAR)
        pixels = (np.asarray(resized, dtype=np.float32) / 255 - self.mean) / self.std
        tensor = torch.from_numpy(pixels.transpose(2, 0, 1))[None].to(self.device)
        heatmaps = self.model(pixel_values=tensor).heatmaps[0].float().cpu()
        points, rows, columns = heatmaps.shape
        if points != COCO_KEYPOINTS:
            raise ControlError(
                f"The pose model gives {points} keypoints; Imagine draws COCO's "
                f"{COCO_KEYPOINTS} (use a VitPose model trained on COCO)."
            )
        scores, flat = heatmaps.flatten(1).max(dim=1)
        found = []
        for score, index in zip(scores.tolist(), flat.tolist(), strict=True):
            row, column = divmod(index, columns)
            x = (column + 0.5) * image.width / columns
            y = (row + 0.5) * image.height / rows
            found.append((x, y, score))
        return found

    def __call__(self, image: Image.Image) -> Image.Image:
        coco = [(x, y) if s >= self.threshold else None for x, y, s in self.keypoints(image)]
        left, right = coco[5], coco[6]
        neck = None
        if left is not None and right is not None:
            neck = ((left[0] + right[0]) / 2, (left[1] + right[1]) / 2)
        points = [neck if index < 0 else coco[index] for index in _OPENPOSE_FROM_COCO]
        return draw_openpose(image.size, points)


def load_preprocessor(
    control: ControlSpec, settings: Settings, device: torch.device
) -> Preprocessor:
    """The preprocessor of ``control``'s type with its settings, its model loaded if any."""
    options = control.preprocessor
    if control.type == "canny":
        return Canny(int(options["low_threshold"]), int(options["high_threshold"]))
    if control.type == "scribble":
        return Scribble(int(options["threshold"]))
    if control.type == "lineart":
        return Lineart()
    if control.type == "tile":
        return Unchanged(identity="tile_resample(1)")
    folder = resolve_folder(options["model"], settings, _PREPROCESSOR_FILES)
    weights = _weights_hash(folder, settings)
    if control.type == "depth":
        return Depth(options["model"], folder, weights, device)
    threshold = float(options["keypoint_threshold"])
    return Pose(options["model"], folder, weights, device, threshold)
