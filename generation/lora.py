"""Style LoRAs on a resident pipeline: checked, loaded once, switched with ``set_adapters``."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from generation.loading import Pipeline
from generation.styles import StyleError, StyleSpec

_LORA_SUFFIX = re.compile(
    r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up|lora_linear_layer\.down|"
    r"lora_linear_layer\.up)(\.[^.]+)?\.weight$|\.alpha$"
)
_DOWN = {"lora_A", "lora.down", "lora_down", "lora_linear_layer.down"}


def adapter_name(style: StyleSpec) -> str:
    # Adapter names become module attribute keys: keep them to identifier characters. The
    # hash tells apart two servers' styles of one name, or a LoRA file replaced on disk.
    return "style_" + re.sub(r"\W", "_", style.name) + "_" + style.sha256[:12]


def check_lora_fits(pipe: Pipeline, style: StyleSpec) -> dict[str, torch.Tensor]:
    """The LoRA's state dict in diffusers form, or :class:`StyleError` if it does not fit.

    diffusers only warns about keys it cannot place; an unusable style must be refused.
    """
    try:
        state, _alphas = pipe.lora_state_dict(str(style.lora_path))
    except Exception as exc:
        raise StyleError(
            f"The LoRA of style {style.name!r} cannot be read ({type(exc).__name__}: {exc}); "
            "it is not a LoRA diffusers understands."
        ) from None
    modules: dict[str, dict[str, Any]] = {}
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is not None:
            modules[component] = dict(model.named_modules())
    misfits: list[str] = []
    checked = 0
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            continue
        component, _, rest = key.partition(".")
        if component not in modules:
            misfits.append(key)
            continue
        match = _LORA_SUFFIX.search(rest)
        if match is None:
            misfits.append(key)
            continue
        module = modules[component].get(rest[: match.start()])
        checked += 1
        down = match.group(1) in _DOWN
        if module is None or not _shape_fits(module, down, tensor):
            misfits.append(key)
    if misfits or checked == 0:
        example = misfits[0] if misfits else "(no LoRA layers found)"
        raise StyleError(
            f"The LoRA of style {style.name!r} does not fit the loaded model: "
            f"{len(misfits)} of {checked or len(state)} layers have no matching place or "
            f"another size (e.g. {example}). It was probably trained for another base model; "
            f"the style says {style.family}."
        )
    return state


def _shape_fits(module: Any, down: bool, tensor: torch.Tensor) -> bool:
    if isinstance(module, torch.nn.Linear):
        expected = module.in_features if down else module.out_features
        return tensor.shape[1 if down else 0] == expected
    if isinstance(module, torch.nn.Conv2d):
        expected = module.in_channels if down else module.out_channels
        return tensor.shape[1 if down else 0] == expected
    return True


class LoraSet:
    """The style LoRAs resident on one pipeline, least recently used evicted first."""

    def __init__(self, pipe: Pipeline, capacity: int) -> None:
        self.pipe = pipe
        self.capacity = capacity
        self._resident: OrderedDict[str, StyleSpec] = OrderedDict()
        self._enabled = False

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def activate(self, styles: Sequence[tuple[StyleSpec, float]]) -> None:
        """Make exactly these styles active, at these weights; none disables LoRA."""
        if len(styles) > self.capacity:
            raise StyleError(
                f"A generation can combine at most {self.capacity} styles; "
                f"{len(styles)} were asked for."
            )
        if not styles:
            if self._enabled:
                self.pipe.disable_lora()
                self._enabled = False
            return
        wanted = {adapter_name(style) for style, _ in styles}
        for style, _weight in styles:
            self._load(style, keep=wanted)
        self.pipe.set_adapters(
            [adapter_name(style) for style, _ in styles],
            adapter_weights=[weight for _, weight in styles],
        )
        if not self._enabled:
            self.pipe.enable_lora()
            self._enabled = True

    def _load(self, style: StyleSpec, keep: set[str]) -> None:
        name = adapter_name(style)
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        state = check_lora_fits(self.pipe, style)
        while len(self._resident) >= self.capacity:
            victim = next(n for n in self._resident if n not in keep)
            self.pipe.delete_adapters(victim)
            del self._resident[victim]
        self.pipe.load_lora_weights(state, adapter_name=name)
        self._resident[name] = style
