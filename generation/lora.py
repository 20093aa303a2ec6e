"""Style LoRAs on a resident pipeline: checked, loaded once, switched with ``set_adapters``."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from generation.loading import Pipeline
from generation.styles import StyleError, StyleSpec
from storage.slot_rank import SlotRank, size_slots
from storage.style_store import lora_format, lycoris_method, lycoris_refusal

log = logging.getLogger(__name__)

# A LoRA layer's key once diffusers has converted the file: component, module, half.
_LORA_KEY = re.compile(
    r"^(?P<component>[a-z_0-9]+)\.(?P<module>.+)\."
    r"(?:lora_(?P<peft>A|B)|lora\.(?P<diffusers>down|up)|lora_linear_layer\.(?P<linear>down|up))"
    r"(?:\.[^.]+)?\.weight$"
)
# diffusers' older spelling, which its kohya conversion still produces: attn1.processor.to_q_lora.
_OLD_KEY = re.compile(
    r"^(?P<component>[a-z_0-9]+)\.(?P<module>.+?)(?:\.processor)?\."
    r"(?P<layer>to_q|to_k|to_v|to_out)_lora\.(?P<half>down|up)\.weight$"
)
_OLD_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def adapter_name(style: StyleSpec) -> str:
    # Adapter names become module attribute keys: keep them to identifier characters. The
    # hash tells apart two servers' styles of one name, or a LoRA file replaced on disk.
    return "style_" + re.sub(r"\W", "_", style.name) + "_" + style.sha256[:12]


@dataclass(frozen=True)
class CheckedLora:
    """A LoRA that fits the pipeline: the file's tensors as they are, for
    ``load_lora_weights`` (which converts kohya keys and applies their alphas), and its
    layers by ``(component, module name, is down half)``."""

    state: dict[str, torch.Tensor]
    layers: dict[tuple[str, str, bool], torch.Tensor]


def lora_layer(key: str) -> tuple[str, str, bool] | None:
    """``(component, module, down)`` of a converted LoRA key; None for alphas, DoRA
    magnitudes and anything that is no LoRA layer."""
    match = _LORA_KEY.match(key)
    if match is not None:
        half = match["peft"] or match["diffusers"] or match["linear"]
        module = match["module"].replace(".processor.", ".")
        return match["component"], module, half in {"A", "down"}
    match = _OLD_KEY.match(key)
    if match is not None:
        names = _OLD_TEXT if match["component"].startswith("text_encoder") else _OLD_UNET
        module = f"{match['module']}.{names[match['layer']]}"
        return match["component"], module, match["half"] == "down"
    return None


def _read(style: StyleSpec) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(style.lora_path))
    except (SafetensorError, OSError) as exc:
        raise StyleError(
            f"The LoRA file of style {style.name!r} ({style.lora_path.name}) is not a readable "
            f".safetensors file ({exc}); it is damaged or cut short, so download it again."
        ) from None


def check_lora_fits(pipe: Pipeline, style: StyleSpec) -> CheckedLora:
    """The LoRA of ``style`` if every layer of it has a place of its size in ``pipe``;
    :class:`StyleError` naming the format and what did not fit otherwise.

    diffusers only warns about keys it cannot place; an unusable style must be refused.
    """
    state = _read(style)
    method = lycoris_method(state)
    if method is not None:
        raise StyleError(
            f"The style {style.name!r}: " + lycoris_refusal(style.lora_path.name, method)
        )
    layout = lora_format(state)
    denoiser = getattr(pipe, "unet", None)
    extra = {"unet_config": denoiser.config} if denoiser is not None else {}
    try:
        read = pipe.lora_state_dict(dict(state), **extra)
        # SD 1.x/SDXL give (state, alphas); SD3 and FLUX the state alone.
        converted = read[0] if isinstance(read, tuple) else read
    except Exception as exc:
        raise StyleError(
            f"The LoRA of style {style.name!r} is in the {layout} layout, but diffusers cannot "
            f"convert it ({type(exc).__name__}: {str(exc)[:200]}); it is not a LoRA for "
            f"{type(pipe).__name__}."
        ) from None
    modules: dict[str, dict[str, Any]] = {}
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is not None:
            modules[component] = dict(model.named_modules())
    misfits: list[str] = []
    layers: dict[tuple[str, str, bool], torch.Tensor] = {}
    for key, tensor in converted.items():
        if key.endswith((".alpha", "lora_magnitude_vector")):
            continue
        layer = lora_layer(key)
        if layer is None:
            misfits.append(key)
            continue
        component, module_name, down = layer
        found = modules.get(component, {})
        if module_name not in found and module_name.startswith("text_model."):
            # transformers 5's CLIP text models hold their layers without the "text_model."
            # that LoRAs (kohya's lora_te_text_model_..., diffusers' keys) still name.
            module_name = module_name.removeprefix("text_model.")
            layer = (component, module_name, down)
        module = found.get(module_name)
        if module is None or not _shape_fits(module, down, tensor):
            misfits.append(key)
            continue
        layers[layer] = tensor
    if misfits or not layers:
        example = misfits[0] if misfits else "(no LoRA layers found)"
        raise StyleError(
            f"The LoRA of style {style.name!r} ({layout} layout) does not fit the loaded "
            f"model: {len(misfits)} of {len(misfits) + len(layers)} layers have no matching "
            f"place or another size (e.g. {example}). It was probably trained for another "
            f"base model; the style says {style.family}."
        )
    return CheckedLora(state, layers)


def _shape_fits(module: Any, down: bool, tensor: torch.Tensor) -> bool:
    # Once a LoRA is loaded, peft wraps the layer; the sizes are its base layer's.
    module = getattr(module, "base_layer", module)
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
        lora = check_lora_fits(self.pipe, style)
        while len(self._resident) >= self.capacity:
            victim = next(n for n in self._resident if n not in keep)
            self.pipe.delete_adapters(victim)
            del self._resident[victim]
        self.pipe.load_lora_weights(dict(lora.state), adapter_name=name)
        self._resident[name] = style


class LoraSlots:
    """Style LoRAs for a compiled denoiser: a fixed number of adapter slots whose weights
    are swapped in place (diffusers' LoRA hot-swap), so no style change recompiles.

    Every slot targets the same layers (the attention blocks' linear and 1x1 layers) at
    one rank, sized at the worker's start (:mod:`storage.slot_rank`; an int is a rank
    the owner fixed); a style fills slot *i* when it is the recipe's *i*-th style, its
    smaller rank padded with zeros. Scales are tensors filled in place. An unused slot
    holds zeros at scale zero, so its output adds exactly nothing: an image is the same
    whatever the slots held before. A job without styles turns the slots off and runs a
    second compiled graph without them, so it pays nothing for them; the warm-up compiles
    both (:meth:`styled_path`).

    Sized automatically, the slots grow for a style added after the start with a larger
    rank (up to IMAGINE_LORA_MAX_RANK): its job runs at once, and styled jobs run
    uncompiled until the worker restarts and compiles the larger slots (:attr:`rank` is
    part of the engine's warmed-up shapes, so the engine knows).
    """

    def __init__(self, pipe: Pipeline, slots: int, rank: SlotRank | int, cache_size: int) -> None:
        self.pipe = pipe
        self.sizing = rank if isinstance(rank, SlotRank) else size_slots(rank, (), rank)
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
        self._layers: list[Any] = []
        if slots:
            self._add_slots(check_compiled="error")

    def _add_slots(self, check_compiled: Literal["error", "ignore"]) -> None:
        """Empty slots of :attr:`rank` on every target layer."""
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        config = LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=self.targets)
        for name in self.names:
            self.denoiser.add_adapter(config, adapter_name=name)
        self.denoiser.set_adapters(self.names)
        prepare_model_for_compiled_hotswap(
            self.denoiser, target_rank=self.rank, check_compiled=check_compiled
        )
        self._layers = [m for m in self.denoiser.modules() if isinstance(m, LoraLayer)]
        self._enabled = True
        for index in range(len(self.names)):
            self._empty(index)

    def _grow(self, style: StyleSpec, needed: int) -> None:
        """Slots large enough for ``style``'s rank ``needed``: the compiled styled graph no
        longer fits them, so styled jobs run uncompiled until the worker restarts."""
        before = self.rank
        grown = size_slots(None, [needed], self.sizing.limit)
        self.sizing = replace(self.sizing, rank=grown.rank, largest=needed)
        for name in self.names:
            self.denoiser.delete_adapters(name)
        self._held = [None] * len(self.names)
        self._base = [{} for _ in self.names]
        self._add_slots(check_compiled="ignore")  # its styled graph is left for eager runs
        log.warning(
            "style slots grew from rank %d to %d for style %r (rank %d), added after this "
            "worker started: styled jobs run uncompiled until it restarts",
            before,
            self.rank,
            style.name,
            needed,
        )

    @property
    def rank(self) -> int:
        """The slots' rank: sized at the start, grown since for a larger style."""
        return self.sizing.rank

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
        for style, _ in styles:  # checked (the slots may grow) before any slot changes
            self._state(style)
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

    @property
    def enabled(self) -> bool:
        """Whether the slots are on: the styled graph runs."""
        return self._enabled and bool(self.names)

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
        lora = check_lora_fits(self.pipe, style)
        self._check_slot_fits(style, lora)
        self._states[name] = lora.state
        while len(self._states) > self._cache_size:
            self._states.popitem(last=False)
        return lora.state

    def _check_slot_fits(self, style: StyleSpec, lora: CheckedLora) -> None:
        targets = set(self.targets)
        rank = 0
        for (component, module, down), tensor in lora.layers.items():
            if component.startswith("text_encoder"):
                raise StyleError(
                    f"The LoRA of style {style.name!r} also changes the text encoder, which "
                    "a compiled worker cannot swap; use a UNet-only LoRA or set "
                    "IMAGINE_COMPILE=off."
                )
            if module not in targets:
                raise StyleError(
                    f"The LoRA of style {style.name!r} changes {module}, outside "
                    "the attention layers a compiled worker swaps styles into; set "
                    "IMAGINE_COMPILE=off to use it."
                )
            if down:
                rank = max(rank, tensor.shape[0])
        if rank <= self.rank:
            return
        if self.sizing.fixed or rank > self.sizing.limit:
            raise StyleError(self.sizing.refusal(style.name, rank))
        self._grow(style, rank)


def slot_targets(denoiser: Any) -> list[str]:
    """The layers style slots cover: every linear (or 1x1 convolution) of the attention
    blocks, where LoRAs trained for Stable Diffusion put their weights."""
    names = []
    for name, module in denoiser.named_modules():
        # UNet attention blocks; SD3's and FLUX's (double and single stream) blocks.
        inside = ".attentions." in name or name.startswith(
            ("transformer_blocks", "single_transformer_blocks")
        )
        if not inside or ".lora_" in name:  # a LoRA's own layers are no targets
            continue
        if isinstance(module, torch.nn.Linear) or (
            isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
        ):
            # A layer a LoRA was once loaded into is wrapped: the wrapper is the target.
            names.append(name.removesuffix(".base_layer"))
    return names
