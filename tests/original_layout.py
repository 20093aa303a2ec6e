"""Writes diffusers models and LoRAs in the layouts people download from Civitai.

A single-file checkpoint in the original (CompVis / Stability "ldm") key layout:
``model.diffusion_model.…`` for the UNet, ``first_stage_model.…`` for the VAE,
``cond_stage_model.transformer.…`` (SD 1.x) or ``conditioner.embedders.0.transformer.…``
and ``conditioner.embedders.1.model.…`` (SDXL, the second in OpenCLIP's layout) for
the text encoders. And LoRAs in kohya's layout (``lora_unet_…``, ``lora_te_…``).

This is the inverse of diffusers' ``single_file_utils`` conversion, written for any
UNet depth (diffusers' own scripts assume the full-size block counts), so the tiny
test models round-trip through ``from_single_file``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_module_to_ldm(name: str, config: Any) -> str:
    """The ldm name of the diffusers UNet module (or parameter) ``name``."""
    for diffusers, ldm in _UNET_TOP.items():
        if name == diffusers or name.startswith(diffusers + "."):
            return ldm + name[len(diffusers) :]
    per_block = config.layers_per_block + 1  # resnets, then a down- or upsampler
    parts = name.split(".")
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.B.downsamplers.0.conv.X
            return f"input_blocks.{1 + block * per_block + config.layers_per_block}.0.op." + (
                ".".join(parts[5:])
            )
        index = 1 + block * per_block + int(parts[3])
        return _inner(f"input_blocks.{index}", kind, parts[4:])
    if parts[0] == "mid_block":
        kind, layer = parts[1], int(parts[2])
        if kind == "attentions":  # middle_block is resnet, attention, resnet: no inner index
            return ".".join(["middle_block.1", *parts[3:]])
        head = _RESNET.get(parts[3], parts[3])
        return ".".join([f"middle_block.{2 * layer}", head, *parts[4:]])
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # up_blocks.B.upsamplers.0.conv.X
            has_attention = "CrossAttn" in config.up_block_types[block]
            index = block * per_block + config.layers_per_block
            return f"output_blocks.{index}.{2 if has_attention else 1}." + ".".join(parts[4:])
        index = block * per_block + int(parts[3])
        return _inner(f"output_blocks.{index}", kind, parts[4:])
    raise ValueError(f"no ldm name for UNet module {name}")


def _inner(prefix: str, kind: str, rest: list[str]) -> str:
    if kind == "resnets":
        head = _RESNET.get(rest[0], rest[0])
        return ".".join([prefix, "0", head, *rest[1:]])
    return ".".join([prefix, "1", *rest])


def _vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    blocks = len(config.up_block_types)
    out = {}
    for key, tensor in state.items():
        name = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(
            r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name
        )
        name = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: (
                f"decoder.up.{blocks - 1 - int(m[1])}."
                + ("block." if m[2] == "resnets" else "upsample.")
            ),
            name,
        )
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        if "mid_block.attentions.0." in name:
            name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
            for diffusers, ldm in (
                ("group_norm", "norm"),
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ):
                name = name.replace(f".{diffusers}.", f".{ldm}.")
            if tensor.ndim == 2:  # the original attention uses 1x1 convolutions
                tensor = tensor[:, :, None, None]
        out["first_stage_model." + name] = tensor
    return out


def _clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {
        prefix + (key if key.startswith("text_model.") else "text_model." + key): tensor
        for key, tensor in state.items()
    }


def _open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The second SDXL text encoder as OpenCLIP stores it: fused q/k/v, transposed projection."""
    state = {key.removeprefix("text_model."): tensor for key, tensor in state.items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
        prefix + "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    state.pop("embeddings.position_ids", None)
    layers = {int(key.split(".")[2]) for key in state if key.startswith("encoder.layers.")}
    for layer in sorted(layers):
        old = f"encoder.layers.{layer}."
        new = f"{prefix}transformer.resblocks.{layer}."
        for part in ("weight", "bias"):
            out[new + f"attn.in_proj_{part}"] = torch.cat(
                [state.pop(old + f"self_attn.{p}_proj.{part}") for p in "qkv"]
            )
            for diffusers, ldm in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[new + f"{ldm}.{part}"] = state.pop(old + f"{diffusers}.{part}")
    if state:
        raise ValueError(f"text encoder keys left unconverted: {sorted(state)[:5]}")
    return out


def original_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """A Stable Diffusion 1.x or SDXL pipeline's weights in the original key layout."""
    unet = pipe.unet
    out = {
        "model.diffusion_model." + unet_module_to_ldm(key, unet.config): tensor
        for key, tensor in unet.state_dict().items()
    }
    out.update(_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update(
            _clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        )
        out.update(
            _open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
        )
    else:
        out.update(_clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    return out


def write_single_file(pipe: Any, path: Path) -> Path:
    """Save ``pipe`` as one ``.safetensors`` checkpoint in the original layout."""
    state = {key: tensor.detach().contiguous() for key, tensor in original_state_dict(pipe).items()}
    save_file(state, str(path))
    return path


_PEFT_KEY = re.compile(
    r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora(?:_(A|B)|\.(down|up))\.weight$"
)


def write_kohya_lora(peft_state: dict[str, torch.Tensor], unet_config: Any, path: Path) -> Path:
    """The LoRA ``peft_state`` (diffusers or peft keys, scale 1) in kohya's layout.

    kohya names SD 1.x UNet layers after diffusers' modules and SDXL ones after the
    original (sgm) UNet; text encoder layers are ``lora_te_`` (``lora_te1_``/``lora_te2_``
    for SDXL). ``alpha`` is saved equal to the rank, so the scale stays 1.
    """
    sdxl = getattr(unet_config, "addition_embed_type", None) == "text_time"
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"not a peft LoRA key: {key}")
        component, module, peft_half, diffusers_half = match.groups()
        half = peft_half or {"down": "A", "up": "B"}[diffusers_half]
        if component == "unet":
            name = unet_module_to_ldm(module, unet_config) if sdxl else module
            prefix = "lora_unet_"
        else:
            prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_"}.get(
                component, "lora_te2_"
            )
            name = module if module.startswith("text_model.") else "text_model." + module
        lora_name = prefix + name.replace(".", "_")
        out[f"{lora_name}.lora_{'down' if half == 'A' else 'up'}.weight"] = tensor.contiguous()
        if half == "A":
            out[f"{lora_name}.alpha"] = torch.tensor(float(tensor.shape[0]))
    save_file(out, str(path))
    return path


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' ``swap_scale_shift`` is its own inverse: the two halves trade places."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_transformer_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``."""
    state = dict(state)
    out = {
        "pos_embed": state.pop("pos_embed.pos_embed"),
        "x_embedder.proj.weight": state.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": state.pop("pos_embed.proj.bias"),
        "final_layer.linear.weight": state.pop("proj_out.weight"),
        "final_layer.linear.bias": state.pop("proj_out.bias"),
    }
    for diffusers, original in (
        ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
        ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
        ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
        ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
        ("context_embedder", "context_embedder"),
    ):
        for part in ("weight", "bias"):
            out[f"{original}.{part}"] = state.pop(f"{diffusers}.{part}")
    for part in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{part}"] = _swap_halves(
            state.pop(f"norm_out.linear.{part}")
        )
    layers = {int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks.")}
    last = max(layers)
    for i in sorted(layers):
        old, x, c = (
            f"transformer_blocks.{i}.",
            f"joint_blocks.{i}.x_block.",
            f"joint_blocks.{i}.context_block.",
        )
        for part in ("weight", "bias"):
            out[f"{x}attn.qkv.{part}"] = torch.cat(
                [state.pop(f"{old}attn.to_{p}.{part}") for p in "qkv"]
            )
            out[f"{c}attn.qkv.{part}"] = torch.cat(
                [state.pop(f"{old}attn.add_{p}_proj.{part}") for p in "qkv"]
            )
            if f"{old}attn2.to_q.{part}" in state:
                out[f"{x}attn2.qkv.{part}"] = torch.cat(
                    [state.pop(f"{old}attn2.to_{p}.{part}") for p in "qkv"]
                )
                out[f"{x}attn2.proj.{part}"] = state.pop(f"{old}attn2.to_out.0.{part}")
            context_mod = state.pop(f"{old}norm1_context.linear.{part}")
            out[f"{c}adaLN_modulation.1.{part}"] = (
                _swap_halves(context_mod) if i == last else context_mod
            )
            pairs = [
                ("attn.to_out.0", f"{x}attn.proj"),
                ("norm1.linear", f"{x}adaLN_modulation.1"),
                ("ff.net.0.proj", f"{x}mlp.fc1"),
                ("ff.net.2", f"{x}mlp.fc2"),
            ]
            if i != last:
                pairs += [
                    ("attn.to_add_out", f"{c}attn.proj"),
                    ("ff_context.net.0.proj", f"{c}mlp.fc1"),
                    ("ff_context.net.2", f"{c}mlp.fc2"),
                ]
            for diffusers, original in pairs:
                out[f"{original}.{part}"] = state.pop(f"{old}{diffusers}.{part}")
        for diffusers, original in (
            ("attn.norm_q", f"{x}attn.ln_q"),
            ("attn.norm_k", f"{x}attn.ln_k"),
            ("attn.norm_added_q", f"{c}attn.ln_q"),
            ("attn.norm_added_k", f"{c}attn.ln_k"),
            ("attn2.norm_q", f"{x}attn2.ln_q"),
            ("attn2.norm_k", f"{x}attn2.ln_k"),
        ):
            if f"{old}{diffusers}.weight" in state:
                out[f"{original}.weight"] = state.pop(f"{old}{diffusers}.weight")
    if state:
        raise ValueError(f"SD3 transformer keys left unconverted: {sorted(state)[:5]}")
    return {"model.diffusion_model." + key: tensor for key, tensor in out.items()}


def sd3_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """An SD3 pipeline's weights as Stability ships them: MMDiT, VAE and the three text
    encoders (``text_encoders.clip_l/clip_g/t5xxl.transformer.…``, in transformers' layout)."""
    out = sd3_transformer_to_original(pipe.transformer.state_dict())
    out.update(_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    out.update(
        _text_encoders(
            clip_l=pipe.text_encoder, clip_g=pipe.text_encoder_2, t5xxl=pipe.text_encoder_3
        )
    )
    return out


def _text_encoders(**encoders: Any) -> dict[str, torch.Tensor]:
    """Text encoders as all-in-one SD3 and FLUX files hold them: transformers' layout under
    ``text_encoders.<name>.transformer.`` (CLIP's under ``text_model.``, which transformers
    5.6 dropped from ``CLIPTextModel``)."""
    out = {}
    for name, encoder in encoders.items():
        for key, tensor in encoder.state_dict().items():
            if key == "encoder.embed_tokens.weight":  # T5 ties it to shared.weight
                continue
            if name.startswith("clip") and not key.startswith(("text_model.", "text_projection")):
                key = "text_model." + key
            out[f"text_encoders.{name}.transformer.{key}"] = tensor
    return out


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


def write_header_only(shapes: dict[str, list[int]], path: Path, dtype: str = "BF16") -> Path:
    """A valid ``.safetensors`` file at full size whose tensors are all zeros, written as a
    header and a sparse hole: a released model's layout, taking neither disk nor memory."""
    header: dict[str, Any] = {}
    offset = 0
    for key, shape in shapes.items():
        size = _DTYPE_BYTES[dtype] * math.prod(shape)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        handle.truncate(8 + len(encoded) + offset)
    return path


def write_sd3_single_file(pipe: Any, path: Path) -> Path:
    state = {key: tensor.detach().contiguous() for key, tensor in sd3_state_dict(pipe).items()}
    save_file(state, str(path))
    return path


def flux_state_dict(transformer: Any) -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer's weights as Black Forest Labs ships them
    (``flux1-dev.safetensors``): fused q/k/v, the single blocks' q/k/v/MLP in one
    ``linear1``, the final modulation as (shift, scale); no prefix, transformer alone.
    It shares generation/flux_checkpoint.py's tables of names, which the tests check
    against diffusers' own conversion."""
    from generation.flux_checkpoint import _DOUBLE, _SINGLE, _TOP

    state = dict(transformer.state_dict())
    out: dict[str, torch.Tensor] = {}

    def move(original: str, diffusers: str) -> None:
        if original.endswith(".scale"):
            out[original] = state.pop(diffusers)
            return
        for part in ("weight", "bias"):
            if f"{diffusers}.{part}" in state:
                out[f"{original}.{part}"] = state.pop(f"{diffusers}.{part}")

    for original, diffusers in _TOP.items():
        move(original, diffusers)
    for part in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{part}"] = _swap_halves(
            state.pop(f"norm_out.linear.{part}")
        )
    for i in range(transformer.config.num_layers):
        old, new = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for original, diffusers in _DOUBLE.items():
            move(new + original, old + diffusers)
        for part in ("weight", "bias"):
            out[f"{new}img_attn.qkv.{part}"] = torch.cat(
                [state.pop(f"{old}attn.to_{p}.{part}") for p in "qkv"]
            )
            out[f"{new}txt_attn.qkv.{part}"] = torch.cat(
                [state.pop(f"{old}attn.add_{p}_proj.{part}") for p in "qkv"]
            )
    for i in range(transformer.config.num_single_layers):
        old, new = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for original, diffusers in _SINGLE.items():
            move(new + original, old + diffusers)
        for part in ("weight", "bias"):
            out[f"{new}linear1.{part}"] = torch.cat(
                [state.pop(f"{old}attn.to_{p}.{part}") for p in "qkv"]
                + [state.pop(f"{old}proj_mlp.{part}")]
            )
    if state:
        raise ValueError(f"FLUX transformer keys left unconverted: {sorted(state)[:5]}")
    return out


def write_flux_single_file(
    transformer: Any, path: Path, prefix: str = "", pipe: Any = None
) -> Path:
    """Save a FLUX transformer as one ``.safetensors`` file in Black Forest Labs' layout
    (``prefix="model.diffusion_model."`` as ComfyUI saves it); with ``pipe``, an all-in-one
    file that also holds its autoencoder (``first_stage_model.…``), CLIP-L and T5."""
    state = {prefix + key: tensor for key, tensor in flux_state_dict(transformer).items()}
    if pipe is not None:
        state.update(_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
        state.update(_text_encoders(clip_l=pipe.text_encoder, t5xxl=pipe.text_encoder_2))
    save_file({key: tensor.detach().contiguous() for key, tensor in state.items()}, str(path))
    return path
