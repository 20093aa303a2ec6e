"""Style LoRAs on a resident pipeline: checked, loaded once, switched with ``set_adapters``."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
        read = pipe.lora_state_dict(str(style.lora_path))
        # SD 1.x/SDXL give (state, alphas); SD3 and FLUX the state alone.
        state = read[0] if isinstance(read, tuple) else read
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


class LoraSlots:
    """Style LoRAs for a compiled denoiser: a fixed number of adapter slots whose weights
    are swapped in place (diffusers' LoRA hot-swap), so no style change recompiles.

    Every slot targets the same layers (the attention blocks' linear and 1x1 layers) at
    rank ``max_rank``; a style fills slot *i* when it is the recipe's *i*-th style, its
    smaller rank padded with zeros. Scales are tensors filled in place. An unused slot
    holds zeros at scale zero, so its output adds exactly nothing: an image is the same
    whatever the slots held before. A job without styles turns the slots off and runs a
    second compiled graph without them, so it pays nothing for them; the warm-up compiles
    both (:meth:`styled_path`).
    """

    def __init__(self, pipe: Pipeline, slots: int, max_rank: int, cache_size: int) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        self.pipe = pipe
        self.max_rank = max_rank
        self.names = [f"slot_{index}" for index in range(slots)]
        self._held: list[str | None] = [None] * slots
        self._base: list[dict[Any, float]] = [{} for _ in range(slots)]
        self._states: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self._warming = False
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        self.denoiser = denoiser
        self._enabled = True
        self.targets = slot_targets(denoiser)
        if not slots:
            self._layers: list[Any] = []
            return
        config = LoraConfig(r=max_rank, lora_alpha=max_rank, target_modules=self.targets)
        for name in self.names:
            denoiser.add_adapter(config, adapter_name=name)
        denoiser.set_adapters(self.names)
        prepare_model_for_compiled_hotswap(denoiser, target_rank=max_rank)
        self._layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
        for index in range(slots):
            self._empty(index)

    @property
    def resident(self) -> list[str]:
        return [name for name in self._held if name is not None]

    def activate(self, styles: Sequence[tuple[StyleSpec, float]]) -> None:
        """Style *i* into slot *i* at its weight; the other slots emptied."""
        if styles and not self.names:
            raise StyleError(
                "This worker runs no styles (IMAGINE_LORA_SLOTS is 0); generate without "
                "--style, or ask the bot's owner to give it style slots."
            )
        if len(styles) > len(self.names):
            raise StyleError(
                f"A generation can combine at most {len(self.names)} styles on this worker "
                f"(IMAGINE_LORA_SLOTS); {len(styles)} were asked for."
            )
        for index, (style, weight) in enumerate(styles):
            name = adapter_name(style)
            if self._held[index] != name:
                self._swap_in(index, style)
            for layer, base in self._base[index].items():
                layer.scaling[self.names[index]].fill_(base * weight)
        for index in range(len(styles), len(self.names)):
            if self._held[index] is not None:
                self._empty(index)
        self._enable(bool(styles) or self._warming)

    @contextmanager
    def styled_path(self) -> Iterator[None]:
        """For the warm-up: jobs in here run the styled graph, their slots empty."""
        self._warming = bool(self.names)
        try:
            yield
        finally:
            self._warming = False

    def _enable(self, enabled: bool) -> None:
        # peft's switch is a flag on every layer: compiled, each state is a graph of its own.
        if enabled != self._enabled and self.names:
            if enabled:
                self.denoiser.enable_adapters()
            else:
                self.denoiser.disable_adapters()
            self._enabled = enabled

    def _swap_in(self, index: int, style: StyleSpec) -> None:
        state = self._state(style)
        slot = self.names[index]
        try:
            self.pipe.load_lora_weights(dict(state), adapter_name=slot, hotswap=True)
        except (ValueError, RuntimeError) as exc:
            self._empty(index)
            raise StyleError(
                f"The LoRA of style {style.name!r} cannot be swapped into the compiled model "
                f"({exc}); use a LoRA with one alpha for all layers, or set IMAGINE_COMPILE=off."
            ) from None
        self._held[index] = adapter_name(style)
        self._base[index] = {
            layer: float(layer.scaling[slot]) for layer in self._layers if slot in layer.scaling
        }

    def _empty(self, index: int) -> None:
        slot = self.names[index]
        for layer in self._layers:
            if slot in layer.lora_B:
                layer.lora_B[slot].weight.data.zero_()
                layer.scaling[slot].fill_(0.0)
        self._held[index] = None
        self._base[index] = {}

    def _state(self, style: StyleSpec) -> dict[str, torch.Tensor]:
        name = adapter_name(style)
        if name in self._states:
            self._states.move_to_end(name)
            return self._states[name]
        state = check_lora_fits(self.pipe, style)
        self._check_slot_fits(style, state)
        self._states[name] = state
        while len(self._states) > self._cache_size:
            self._states.popitem(last=False)
        return state

    def _check_slot_fits(self, style: StyleSpec, state: dict[str, torch.Tensor]) -> None:
        targets = set(self.targets)
        for key, tensor in state.items():
            component, _, rest = key.partition(".")
            if component.startswith("text_encoder"):
                raise StyleError(
                    f"The LoRA of style {style.name!r} also changes the text encoder, which "
                    "a compiled worker cannot swap; use a UNet-only LoRA or set "
                    "IMAGINE_COMPILE=off."
                )
            match = _LORA_SUFFIX.search(rest)
            if match is None or key.endswith(".alpha"):
                continue
            if rest[: match.start()] not in targets:
                raise StyleError(
                    f"The LoRA of style {style.name!r} changes {rest[: match.start()]}, outside "
                    "the attention layers a compiled worker swaps styles into; set "
                    "IMAGINE_COMPILE=off to use it."
                )
            if match.group(1) in _DOWN and tensor.shape[0] > self.max_rank:
                raise StyleError(
                    f"The LoRA of style {style.name!r} has rank {tensor.shape[0]}, above the "
                    f"{self.max_rank} of this worker's style slots (IMAGINE_LORA_MAX_RANK)."
                )


def slot_targets(denoiser: Any) -> list[str]:
    """The layers style slots cover: every linear (or 1x1 convolution) of the attention
    blocks, where LoRAs trained for Stable Diffusion put their weights."""
    names = []
    for name, module in denoiser.named_modules():
        # UNet attention blocks; SD3's and FLUX's (double and single stream) blocks.
        inside = ".attentions." in name or name.startswith(
            ("transformer_blocks", "single_transformer_blocks")
        )
        if not inside:
            continue
        if isinstance(module, torch.nn.Linear) or (
            isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
        ):
            names.append(name)
    return names
