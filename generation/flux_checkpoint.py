"""FLUX transformers in Black Forest Labs' key layout, read at any width.

diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` assumes FLUX.1's width
(3072), so a narrower model such as the tiny test one cannot load through it.
Here every size is read from the tensors: the layer counts from the block indices, the
width from ``img_in``, the head size from the query norm, the guidance embedding (dev,
not schnell) from ``guidance_in``. Only the rotary axes are not in the weights: they come
from the family's config and must add up to the head size.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from storage.errors import ConfigError

_PREFIX = "model.diffusion_model."
# Renames that keep the tensor as it is: original name → diffusers name.
_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {
    "modulation.lin": "norm.linear",
    "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
# The fused q/k/v projections, split into diffusers' three.
_DOUBLE_QKV = {"img_attn.qkv": "attn.to_{}", "txt_attn.qkv": "attn.add_{}_proj"}
_MLP_RATIO = 4  # diffusers' FLUX blocks are built with it
_OTHER_PARTS = ("vae.", "text_encoders.", "first_stage_model.", "cond_stage_model.")


def _layers(keys: Any, block: str) -> int:
    found = {int(m[1]) for key in keys if (m := re.match(rf"{block}\.(\d+)\.", key))}
    return max(found) + 1 if found else 0


def transformer_keys(keys: Any) -> list[str]:
    """The transformer's tensors: all of a Black Forest Labs file; those under
    ``model.diffusion_model.`` in an all-in-one file that also holds the VAE and encoders."""
    keys = list(keys)
    if any(key.startswith(_PREFIX) for key in keys):
        return [key for key in keys if key.startswith(_PREFIX)]
    return [key for key in keys if not key.startswith(_OTHER_PARTS)]


def flux_transformer_config(
    shapes: dict[str, list[int]], base: dict[str, Any], source: object
) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` config of the checkpoint ``source``, from its tensor
    shapes; ``base`` (the family's config) gives what the weights do not hold: the patch size
    and the rotary axes."""
    bare = {key.removeprefix(_PREFIX): shape for key, shape in shapes.items()}
    try:
        width, in_channels = bare["img_in.weight"]
        head_dim = bare["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        fused = bare.get("single_blocks.0.linear1.weight", [None])[0]
        config = dict(base) | {
            "in_channels": in_channels,
            "out_channels": bare["final_layer.linear.weight"][0] // base.get("patch_size", 1) ** 2,
            "num_layers": _layers(bare, "double_blocks"),
            "num_single_layers": _layers(bare, "single_blocks"),
            "attention_head_dim": head_dim,
            "num_attention_heads": width // head_dim,
            "joint_attention_dim": bare["txt_in.weight"][1],
            "pooled_projection_dim": bare["vector_in.in_layer.weight"][1],
            "guidance_embeds": "guidance_in.in_layer.weight" in bare,
        }
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as exc:
        raise ConfigError(
            f"{source} lacks a tensor every FLUX transformer has ({exc}); it may be "
            "damaged or in another layout, so download it again or use a diffusers folder."
        ) from None
    if config["in_channels"] != config["out_channels"] * config.get("patch_size", 1) ** 2:
        raise ConfigError(
            f"{source} is a FLUX Fill, Canny or Depth model (its transformer reads "
            f"{in_channels} channels, not {config['out_channels']}): it needs an image to work "
            "from, and Imagine generates from text; use FLUX.1 dev or schnell, or a fine-tune."
        )
    if width % head_dim or (fused is not None and fused != (3 + _MLP_RATIO) * width):
        raise ConfigError(
            f"{source}: its sizes do not fit together (width {width}, head size "
            f"{head_dim}); Imagine reads FLUX.1-shaped transformers only."
        )
    if sum(config.get("axes_dims_rope", (16, 56, 56))) != head_dim:
        raise ConfigError(
            f"{source} has heads of {head_dim}, which FLUX.1's rotary positions "
            f"({config.get('axes_dims_rope')}) do not fit; use its diffusers folder instead."
        )
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    return config


def convert_flux_transformer(
    state: dict[str, torch.Tensor], config: dict[str, Any], source: object
) -> dict[str, torch.Tensor]:
    """Black Forest Labs' FLUX transformer weights (of the checkpoint ``source``) under
    diffusers' names, for the model ``config`` describes."""
    state = {key.removeprefix(_PREFIX): tensor for key, tensor in state.items()}
    try:
        out = _renamed(state, config)
    except KeyError as exc:
        raise ConfigError(
            f"{source} lacks the FLUX transformer tensor {exc}; it may be damaged or in another "
            "layout, so download it again or use a diffusers folder."
        ) from None
    if state:
        raise ConfigError(
            f"{source} holds tensors Imagine does not know ({sorted(state)[:3]}); "
            "it may be a FLUX variant other than FLUX.1 dev or schnell: use its diffusers folder."
        )
    return out


def _renamed(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Pops each tensor of ``state`` into its diffusers name and place."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, torch.Tensor] = {}

    def move(old: str, new: str) -> None:
        if old.endswith(".scale"):
            out[new] = state.pop(old)
            return
        for part in ("weight", "bias"):
            out[f"{new}.{part}"] = state.pop(f"{old}.{part}")

    for old, new in _TOP.items():
        if old.startswith("guidance_in.") and not config["guidance_embeds"]:
            continue
        move(old, new)
    for part in ("weight", "bias"):
        # The original's final modulation is (shift, scale); diffusers' is (scale, shift).
        shift, scale = state.pop(f"final_layer.adaLN_modulation.1.{part}").chunk(2, dim=0)
        out[f"norm_out.linear.{part}"] = torch.cat([scale, shift], dim=0)
    for i in range(config["num_layers"]):
        old, new = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for original, diffusers in _DOUBLE.items():
            move(old + original, new + diffusers)
        for original, diffusers in _DOUBLE_QKV.items():
            for part in ("weight", "bias"):
                for letter, tensor in zip(
                    "qkv", state.pop(f"{old}{original}.{part}").chunk(3, dim=0), strict=True
                ):
                    out[f"{new}{diffusers.format(letter)}.{part}"] = tensor.contiguous()
    for i in range(config["num_single_layers"]):
        old, new = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for original, diffusers in _SINGLE.items():
            move(old + original, new + diffusers)
        for part in ("weight", "bias"):
            q, k, v, mlp = state.pop(f"{old}linear1.{part}").split(
                [width, width, width, _MLP_RATIO * width], dim=0
            )
            out |= {
                f"{new}attn.to_q.{part}": q.contiguous(),
                f"{new}attn.to_k.{part}": k.contiguous(),
                f"{new}attn.to_v.{part}": v.contiguous(),
                f"{new}proj_mlp.{part}": mlp.contiguous(),
            }
    return out
