"""Tiny random-weight pipelines and LoRAs, built in code, for tests and offline use.

A tiny pipeline is saved with ``save_pretrained`` and then loaded back through
the same code as any local diffusers folder, so tests exercise the real
loading path. Nothing here downloads anything.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

TINY_MODELS = {
    "tiny": "sd",
    "tiny-sd": "sd",
    "tiny-sdxl": "sdxl",
    "tiny-sd3": "sd3",
    "tiny-flux": "flux",
    "tiny-upscaler": "upscaler",
}
T5_TINY_MAX_LENGTH = 32  # the tiny T5's max_sequence_length: short, so a test can exceed it
_SEED = 0


def _tokenizer() -> CLIPTokenizer:
    # Byte-level alphabet, each symbol also as a word end: any text tokenizes, no merges needed.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = specials + alphabet + [symbol + "</w>" for symbol in alphabet]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


def _t5_tokenizer() -> T5Tokenizer:
    """A character-level Unigram vocabulary (no sentencepiece model needed): any ASCII text
    tokenizes, one piece per character."""
    characters = [chr(code) for code in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(character, -3.0) for character in characters]
    pieces += [("\u2581" + character, -4.0) for character in characters]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = T5_TINY_MAX_LENGTH
    return tokenizer


def _t5(hidden_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=200,
            d_model=hidden_size,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _text_config(projection: bool, hidden_size: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        projection_dim=hidden_size if projection else 512,
        hidden_act="gelu",
    )


def _vae(latent_channels: int = 4, **flow: Any) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        **flow,
    )


def _flow_vae() -> AutoencoderKL:
    """16 latent channels, no quant convs, shifted and scaled: the SD3 / FLUX autoencoder's
    layout."""
    return _vae(
        16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def _unet(**family: Any) -> UNet2DConditionModel:
    """Two blocks, one attention level: the smallest UNet the SD pipelines accept."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **family,
    )


def build_tiny_sd() -> StableDiffusionPipeline:
    torch.manual_seed(_SEED)
    unet = _unet(
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(projection=False))
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    torch.manual_seed(_SEED)
    unet = _unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=96,  # 6 * 8 time ids + 48 pooled text
        cross_attention_dim=80,  # the two text encoders' widths, 32 + 48
        norm_num_groups=32,
    )
    vae = _vae()
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(projection=True)),
        tokenizer=_tokenizer(),
        # Two widths, as in the real SDXL (768 and 1280): a single-file checkpoint's loader
        # tells the two encoders apart by their width.
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=True, hidden_size=48)),
        tokenizer_2=_tokenizer(),
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=False,
    )


def build_tiny_sd3() -> StableDiffusion3Pipeline:
    """SD 3.5 in miniature: MMDiT with QK norm and a dual-attention layer, CLIP-L, CLIP-G
    and T5 text encoders, a 16-channel autoencoder, flow matching.

    Shaped like the real one where a single-file checkpoint depends on it: CLIP-G is wider
    than CLIP-L (diffusers tells the two apart by width) and CLIP-L's projection is the
    identity (Stability's files do not hold it)."""
    torch.manual_seed(_SEED)
    transformer = SD3Transformer2DModel(
        sample_size=48,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=96,  # T5's width; the CLIP embeddings (32 + 48) are padded to it
        caption_projection_dim=32,
        pooled_projection_dim=80,  # the two CLIP projections side by side
        pos_embed_max_size=64,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    clip_l = CLIPTextModelWithProjection(_text_config(projection=True))
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(32))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_flow_vae(),
        text_encoder=clip_l,
        tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=True, hidden_size=48)),
        tokenizer_2=_tokenizer(),
        text_encoder_3=_t5(96),
        tokenizer_3=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_tiny_flux() -> FluxPipeline:
    """FLUX.1-dev in miniature: double and single stream blocks, distilled guidance
    embedding, CLIP-L pooled text plus T5, a 16-channel autoencoder, packed latents."""
    torch.manual_seed(_SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    return FluxPipeline(
        transformer=transformer,
        vae=_flow_vae(),
        text_encoder=CLIPTextModel(_text_config(projection=False)),
        tokenizer=_tokenizer(),
        text_encoder_2=_t5(64),
        tokenizer_2=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    )


def build_tiny_upscaler() -> StableDiffusionUpscalePipeline:
    """A tiny stand-in for stable-diffusion-x4-upscaler: 4x output, same components."""
    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=7,  # 4 latent + 3 low-resolution image channels
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
    )
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(projection=False)),
        tokenizer=_tokenizer(),
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
        max_noise_level=99,
    )


def save_tiny_model(kind: str, folder: Path) -> Path:
    """Build the tiny ``kind`` (sd, sdxl, sd3, flux or upscaler) pipeline; save it as a
    diffusers folder."""
    builders = {
        "sd": build_tiny_sd,
        "sdxl": build_tiny_sdxl,
        "sd3": build_tiny_sd3,
        "flux": build_tiny_flux,
        "upscaler": build_tiny_upscaler,
    }
    pipe: Any = builders[kind]()
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def ensure_tiny_model(name: str, models_dir: Path) -> Path:
    """The folder of the tiny model ``name``, building it on first use."""
    folder = models_dir / ("tiny-sd" if name == "tiny" else name)
    if (folder / "model_index.json").is_file():
        return folder
    models_dir.mkdir(parents=True, exist_ok=True)
    # Two workers starting at once: one builds while the other waits, so neither ever
    # replaces a folder the other is already loading.
    with (models_dir / f".{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "model_index.json").is_file():
            return folder
        # Built aside and renamed into place, so a half-built folder is never loaded.
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        save_tiny_model(TINY_MODELS[name], partial)
        shutil.rmtree(folder, ignore_errors=True)  # a leftover without its index
        partial.rename(folder)
    return folder


def build_tiny_lora(
    denoiser: Any, path: Path, *, seed: int = 1, rank: int = 4, scale: float = 0.5
) -> Path:
    """Save a random LoRA for ``denoiser`` (a UNet, or an SD3 / FLUX transformer) as a
    diffusers-format ``.safetensors`` file.

    ``lora_B`` is random (not zero, as a fresh adapter would be) so the LoRA
    visibly changes images.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    adapter = f"tiny_lora_{seed}"
    torch.manual_seed(seed)
    denoiser.add_adapter(config, adapter_name=adapter)
    try:
        state = get_peft_model_state_dict(denoiser, adapter_name=adapter)
        state = {key: value * scale for key, value in state.items()}
        layers = convert_state_dict_to_diffusers(state)
        # The file's keys start with the component: "unet." or "transformer.".
        if isinstance(denoiser, UNet2DConditionModel):
            StableDiffusionPipeline.save_lora_weights(
                save_directory=path.parent,
                unet_lora_layers=layers,
                weight_name=path.name,
                safe_serialization=True,
            )
        else:
            StableDiffusion3Pipeline.save_lora_weights(
                save_directory=path.parent,
                transformer_lora_layers=layers,
                weight_name=path.name,
                safe_serialization=True,
            )
    finally:
        denoiser.delete_adapters(adapter)
    return path


def save_tiny_controlnet(kind: str, folder: Path, *, seed: int = 1) -> Path:
    """A random ControlNet for the tiny ``kind`` (sd, sdxl, sd3 or flux) model, saved as a
    diffusers folder.

    Built from the tiny UNet or transformer as real ControlNets are; its zero layers get
    random weights (trained ones are not zero), so that the control visibly steers the image.
    """
    from diffusers import ControlNetModel, FluxControlNetModel, SD3ControlNetModel

    if kind in ("sd3", "flux"):
        torch.manual_seed(seed)
        net: Any
        if kind == "sd3":
            sd3: Any = build_tiny_sd3()
            transformer = sd3.transformer
            net = SD3ControlNetModel.from_transformer(
                transformer, num_layers=1, num_extra_conditioning_channels=0
            )
            zero_layers = [*net.controlnet_blocks, net.pos_embed_input.proj]
        else:
            flux: Any = build_tiny_flux()
            transformer = flux.transformer
            net = FluxControlNetModel.from_transformer(
                transformer,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
            )
            zero_layers = [
                *net.controlnet_blocks,
                *net.controlnet_single_blocks,
                net.controlnet_x_embedder,
            ]
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in zero_layers:
                torch.nn.init.normal_(layer.weight, std=0.3)
                torch.nn.init.normal_(layer.bias, std=0.1)
        net.save_pretrained(folder, safe_serialization=True)
        return folder

    pipe: Any = build_tiny_sdxl() if kind == "sdxl" else build_tiny_sd()
    unet = pipe.unet
    torch.manual_seed(seed)
    # The tiny VAE halves the side once: the map is embedded down by 2, not SD's 8.
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    zero_convs = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.3)
            torch.nn.init.normal_(conv.bias, std=0.1)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_depth_estimator(folder: Path) -> Path:
    """A random DPT depth estimator with its image processor, as a transformers folder."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(_SEED)
    settings: dict[str, Any] = dict(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
        head_hidden_size=8,
    )
    config = DPTConfig(**settings)
    DPTForDepthEstimation(config).save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_pose_estimator(folder: Path) -> Path:
    """A random VitPose keypoint model (COCO's 17 points) with its processor settings."""
    from transformers import (
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
        VitPoseImageProcessor,
    )

    torch.manual_seed(_SEED)
    settings: dict[str, Any] = dict(
        image_size=[64, 48],
        patch_size=[16, 16],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        out_indices=[2],
    )
    backbone = VitPoseBackboneConfig(**settings)
    head: dict[str, Any] = {"scale_factor": 4, "num_labels": 17}  # COCO's 17 keypoints
    config = VitPoseConfig(backbone_config=backbone, **head)
    model = VitPoseForPoseEstimation(config)
    model.save_pretrained(folder, safe_serialization=True)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(folder)
    return folder


def write_tiny_controls(
    folder: Path,
    family: str = "tiny-sd",
    types: tuple[str, ...] = ("canny", "depth", "pose", "lineart", "scribble", "tile"),
) -> Path:
    """A controls folder for the tiny ``family`` (tiny-sd, tiny-sdxl, tiny-sd3 or tiny-flux):
    a random ControlNet per control type, the tiny depth and pose estimators, and one TOML
    file per control."""
    kind = TINY_MODELS[family]
    folder.mkdir(parents=True, exist_ok=True)
    models = folder / "models"
    if not (models / "depth" / "config.json").is_file():
        save_tiny_depth_estimator(models / "depth")
    if not (models / "pose" / "config.json").is_file():
        save_tiny_pose_estimator(models / "pose")
    extra = {
        "depth": '[preprocessor]\nmodel = "models/depth"\n',
        "pose": '[preprocessor]\nmodel = "models/pose"\nkeypoint_threshold = 0.0\n',
    }
    for number, control in enumerate(types, start=1):
        name = f"{control}-{family}"
        save_tiny_controlnet(kind, models / name, seed=number)
        (folder / f"{name}.toml").write_text(
            f'name = "{name}"\ntype = "{control}"\nmodel = "models/{name}"\n'
            f'family = "{family}"\n' + extra.get(control, "")
        )
    return folder
