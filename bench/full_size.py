"""Full-size architectures at random weights, built in code straight on the device.

For GPU benchmarks with no downloads: the real shapes (configs in code), random
weights, built under ``torch.device(device)`` in the run's dtype. Building FLUX.1-dev's
12 B transformer this way takes about a second on a GPU, where saving and reloading a
folder takes minutes. The tokenizers are the tiny models' (built in code); a random
model reads any token ids.

    from bench.full_size import build_loaded
    loaded = build_loaded("flux-dev", torch.device("cuda"), torch.bfloat16)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from generation.loading import LoadedModel, ModelSource, quiet_libraries
from generation.memory import place, quantize_weights, recipe_quantization
from storage.families import FAMILIES

SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "layers_per_block": 2,
}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "layers_per_block": 2,
}
VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
}
# SD3 and FLUX: 16 latent channels, no quant convs, shifted and scaled latents.
FLOW_VAE = {
    **VAE,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SD3_VAE_SCALING = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE_SCALING = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD35_LARGE = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
SD35_MEDIUM = {
    **SD35_LARGE,
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
}
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# T5 v1.1 XXL, the encoder SD3 and FLUX read prompts with (4.7 B parameters).
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
}

ARCHS = {
    "sd15-full": "sd15",
    "sdxl-full": "sdxl",
    "sd35-large": "sd3",
    "sd35-medium": "sd3",
    "flux-dev": "flux",
    "flux-schnell": "flux-schnell",
}


@contextmanager
def _building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _clip(hidden: int, layers: int, heads: int, projection: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def build_pipe(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """The diffusers pipeline of ``arch`` at random weights, on ``device`` in ``dtype``."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from generation.tiny import _scheduler, _t5_tokenizer, _tokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    # Schedulers and tokenizers hold no weights: built outside the device context.
    schnell = arch == "flux-schnell"
    t5_tokenizer = _t5_tokenizer()
    t5_tokenizer.model_max_length = 512 if arch == "flux-dev" else 256
    flow_scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        **(
            {"shift": 3.0}
            if arch.startswith("sd35")
            else {
                "shift": 1.0 if schnell else 3.0,
                "use_dynamic_shifting": not schnell,
                "base_shift": 0.5,
                "max_shift": 1.15,
                "base_image_seq_len": 256,
                "max_image_seq_len": 4096,
            }
        )
    )
    tokenizers = {"tokenizer": _tokenizer(), "tokenizer_2": _tokenizer()}
    with _building(device, dtype):
        if arch in ("sd15-full", "sdxl-full"):
            unet = diffusers.UNet2DConditionModel(
                **(SD15_UNET if arch == "sd15-full" else SDXL_UNET)
            )
            vae = diffusers.AutoencoderKL(**VAE)
            clip_l: Any = CLIPTextModel(_clip(768, 12, 12, 768))
            clip_g = (
                CLIPTextModelWithProjection(_clip(1280, 32, 20, 1280))
                if arch == "sdxl-full"
                else None
            )
        else:
            t5 = T5EncoderModel(T5Config(**T5_XXL))
            if arch.startswith("sd35"):
                transformer: Any = diffusers.SD3Transformer2DModel(
                    **(SD35_LARGE if arch == "sd35-large" else SD35_MEDIUM)
                )
                vae = diffusers.AutoencoderKL(**FLOW_VAE, **SD3_VAE_SCALING)
                clip_l = CLIPTextModelWithProjection(_clip(768, 12, 12, 768))
                clip_g = CLIPTextModelWithProjection(_clip(1280, 32, 20, 1280))
            else:
                transformer = diffusers.FluxTransformer2DModel(
                    **{**FLUX_DEV, "guidance_embeds": not schnell}
                )
                vae = diffusers.AutoencoderKL(**FLOW_VAE, **FLUX_VAE_SCALING)
                clip_l = CLIPTextModel(_clip(768, 12, 12, 768))
    if arch == "sd15-full":
        return diffusers.StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=clip_l, tokenizer=tokenizers["tokenizer"],
            scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
    if arch == "sdxl-full":
        return diffusers.StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=clip_l, text_encoder_2=clip_g,
            scheduler=_scheduler(), **tokenizers,
        )  # fmt: skip
    if arch.startswith("sd35"):
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, text_encoder=clip_l, text_encoder_2=clip_g,
            text_encoder_3=t5, tokenizer_3=t5_tokenizer, scheduler=flow_scheduler, **tokenizers,
        )  # fmt: skip
    return diffusers.FluxPipeline(
        transformer=transformer, vae=vae, text_encoder=clip_l,
        tokenizer=tokenizers["tokenizer"], text_encoder_2=t5, tokenizer_2=t5_tokenizer,
        scheduler=flow_scheduler,
    )  # fmt: skip


def build_loaded(
    arch: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    offload: str = "none",
    quantize: str = "none",
) -> LoadedModel:
    """``arch`` built at random weights, placed as ``load_model`` places a loaded model
    (``IMAGINE_OFFLOAD`` and ``IMAGINE_QUANTIZE`` as given). Built on ``device`` even when
    offloaded (random initialisation is fast there), then moved to CPU memory."""
    quiet_libraries()
    pipe = build_pipe(arch, device, dtype, seed)
    quantize_weights(pipe, quantize)
    if offload != "none":
        pipe.to("cpu")
        place(pipe, device, offload)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(
        pipe=pipe,
        source=ModelSource(arch, "built", Path(arch)),
        family=FAMILIES[ARCHS[arch]],
        model_hash=f"random-{seed}",
        device=device,
        dtype=dtype,
        quantization=recipe_quantization(quantize),
        offload=offload,
    )


def save_full_size(arch: str, folder: Path) -> Path:
    """``arch`` at random weights saved as a diffusers folder, for code that loads one
    (a ControlNet built from its UNet, say). Slow for big models: prefer :func:`build_loaded`."""
    build_pipe(arch, torch.device("cpu"), torch.float32).save_pretrained(
        folder, safe_serialization=True
    )
    return folder
