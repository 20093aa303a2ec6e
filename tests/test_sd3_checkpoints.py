"""SD 3 medium, SD 3.5 medium and SD 3.5 large (and large turbo) as single files, offline.

Each is told apart by its keys and read with the configs Imagine ships. The released
models are far too big to build here, so they are built at full size on the meta device
(shapes, no weights), written in Stability's layout as a full-size safetensors file that
is a header and a sparse hole, and read back: by Imagine's detection, by diffusers' own
(``infer_diffusers_model_type``) and by diffusers' converter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from generation.loading import load_model
from generation.single_file import CONFIGS, config_folder, describe_single_file
from generation.tiny import ensure_tiny_model
from storage.checkpoints import detect_checkpoint
from storage.errors import ConfigError
from storage.families import guess_family
from storage.settings import Settings
from tests.original_layout import sd3_state_dict, sd3_transformer_to_original, write_header_only

_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Released:
    """What is known of a released model, independently of our configs."""

    diffusers_name: str  # what diffusers' infer_diffusers_model_type calls it
    width: int
    size: float  # the transformer in 16-bit, as the hub lists it
    positions: int  # pos_embed's
    qk_norm: bool
    dual_attention: bool


# The sizes: the hub's diffusion_pytorch_model files (4.17 GB, 4.94 GB) and SD 3.5 large's
# index.json total_size, which turbo's shares.
RELEASED = {
    "sd3-medium": Released("sd3", 1536, 4.17e9, 192 * 192, qk_norm=False, dual_attention=False),
    "sd35-medium": Released("sd35_medium", 1536, 4.94e9, 384 * 384, True, dual_attention=True),
    "sd35-large": Released("sd35_large", 2432, 16_292_561_536, 192 * 192, True, False),
}


def full_size(configs: str) -> Any:
    """A released SD3 pipeline's components from our config folder, on the meta device."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    folder = CONFIGS / configs
    with torch.device("meta"):
        return SimpleNamespace(
            transformer=SD3Transformer2DModel.from_config(
                SD3Transformer2DModel.load_config(folder / "transformer")
            ),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            text_encoder=CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder")
            ),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            ),
            text_encoder_3=T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_3")),
        )


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {key: list(tensor.shape) for key, tensor in state.items()}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Downloads off, and the tiny SD3 model's tokenizers standing in for CLIP's and T5's
    vocabularies (which Imagine does not ship)."""
    data = tmp_path_factory.mktemp("sd3-data")
    tiny = ensure_tiny_model("tiny-sd3", data / "models")
    return Settings(
        data_dir=data,
        device="cpu",
        allow_downloads=False,
        clip_tokenizer=tiny / "tokenizer",
        t5_tokenizer=tiny / "tokenizer_3",
    )


@pytest.mark.parametrize("configs", list(RELEASED))
def test_a_full_size_sd3_file_is_its_family_with_its_shipped_configs_offline(
    configs: str, settings: Settings, no_network: None, tmp_path: Path
) -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    released = RELEASED[configs]
    original = sd3_state_dict(full_size(configs))
    shapes = _shapes(original)
    width = released.width
    assert shapes[_PREFIX + "x_embedder.proj.weight"] == [width, 16, 2, 2]
    assert shapes[_PREFIX + "pos_embed"] == [1, released.positions, width]
    assert infer_diffusers_model_type(original) == released.diffusers_name  # diffusers agrees

    bare = {key.removeprefix(_PREFIX): shape for key, shape in shapes.items()}
    for layout in (shapes, bare):  # Stability's prefix, or ComfyUI's bare transformer keys
        entry = detect_checkpoint(Path(f"{configs}.safetensors"), layout)
        assert (entry.family, entry.configs) == ("sd3", configs)
        assert config_folder(entry, settings) == CONFIGS / configs

    name = {"sd35-large": "sd3.5_large.safetensors"}.get(configs, f"{configs}.safetensors")
    checkpoint = write_header_only(shapes, tmp_path / name)
    assert checkpoint.stat().st_size > 9 * 10**9  # the full size, as a sparse hole
    assert guess_family(str(checkpoint)).name == "sd3"
    assert describe_single_file(checkpoint, settings) == "a sd3 checkpoint, loadable offline"
    if configs == "sd35-large":  # turbo has large's tensors: its name picks its defaults
        turbo = checkpoint.rename(tmp_path / "sd3_large_turbo.safetensors")
        assert guess_family(str(turbo)).name == "sd3-turbo"
        assert "sd3-turbo checkpoint, loadable offline" in describe_single_file(turbo, settings)


@pytest.mark.parametrize("configs", list(RELEASED))
def test_the_shipped_transformer_config_takes_diffusers_conversion_of_the_released_layout(
    configs: str,
) -> None:
    """What ``from_single_file`` does with our config: diffusers converts the original
    keys (inferring depth, dual attention and QK norm from them), and the converted
    tensors must be exactly the model's, with the released model's size."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    transformer = full_size(configs).transformer
    state = transformer.state_dict()
    original = sd3_transformer_to_original(state)
    released = RELEASED[configs]
    size = 2 * sum(tensor.numel() for tensor in state.values())
    assert abs(size - released.size) < 0.01e9, f"{size / 1e9:.3f} GB in 16-bit"
    qk_norm = _PREFIX + "joint_blocks.0.x_block.attn.ln_q.weight"
    dual = _PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight"
    assert (qk_norm in original, dual in original) == (released.qk_norm, released.dual_attention)
    last = transformer.config.num_layers - 1
    context = f"{_PREFIX}joint_blocks.{last}.context_block.adaLN_modulation.1.weight"
    assert list(original[context].shape) == [2 * released.width, released.width]  # pre-only

    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert _shapes(converted) == _shapes(state)


def test_the_shipped_sd3_folders_are_complete_and_differ_only_in_the_transformer() -> None:
    """SD 3.5 keeps SD 3 medium's text encoders, autoencoder and scheduler (Hugging Face's
    SD 3.5 release notes); each folder holds a config for every component it names."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = CONFIGS / "sd35-medium"
    for configs in RELEASED:
        folder = CONFIGS / configs
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusion3Pipeline"
        parts = {name for name, value in index.items() if name[0] != "_" and value[0]}
        assert parts == {p.name for p in folder.iterdir() if p.is_dir()}
        for part in sorted(parts):
            files = sorted(p.name for p in (folder / part).iterdir())
            assert files == [
                "scheduler_config.json"
                if part == "scheduler"
                else "tokenizer_config.json"
                if part.startswith("tokenizer")
                else "config.json"
            ], part
            if part != "transformer":
                assert (folder / part / files[0]).read_text() == (
                    reference / part / files[0]
                ).read_text(), f"{configs}/{part}"
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        assert scheduler.config.shift == 3.0


def _mmdit(width: int, *keys: str) -> dict[str, list[int]]:
    shapes = {
        _PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": [3 * width, width],
        _PREFIX + "x_embedder.proj.weight": [width, 16, 2, 2],
    }
    return shapes | {_PREFIX + key: [64] for key in keys}


def test_an_mmdit_that_is_none_of_the_released_models_loads_from_the_hub_or_is_refused(
    settings: Settings, no_network: None, tmp_path: Path
) -> None:
    """Width 1536 with QK norm but no dual attention, or width 2432 with dual attention,
    fits none of the shipped configs: it is left to diffusers' hub configs, and offline
    it is refused with a sentence rather than read with the wrong sizes."""
    odd = {
        "qk-norm-1536": _mmdit(1536, "joint_blocks.0.x_block.attn.ln_q.weight"),
        "dual-2432": _mmdit(
            2432,
            "joint_blocks.0.x_block.attn.ln_q.weight",
            "joint_blocks.0.x_block.attn2.ln_q.weight",
        )
        | {_PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight": [3 * 2432, 2432]},
        "sd3-width-2048": _mmdit(2048),
    }
    for name, shapes in odd.items():
        entry = detect_checkpoint(Path(name), shapes)
        assert (entry.family, entry.configs, config_folder(entry, settings)) == ("sd3", None, None)
        checkpoint = write_header_only(shapes, tmp_path / f"{name}.safetensors")
        with pytest.raises(ConfigError, match="whose configuration Imagine does not ship"):
            describe_single_file(checkpoint, settings)
    assert detect_checkpoint(Path("sd3"), _mmdit(1536)).configs == "sd3-medium"


def test_only_sd3_files_take_a_variant_from_their_name(tmp_path: Path) -> None:
    """A FLUX file's keys say dev or schnell; a name saying otherwise does not override them."""
    dev = {
        "double_blocks.0.img_attn.qkv.weight": [9216, 3072],
        "guidance_in.in_layer.weight": [3072, 256],
        "img_in.weight": [3072, 64],
    }
    misnamed = write_header_only(dev, tmp_path / "my-schnell-merge.safetensors")
    assert guess_family(str(misnamed)).name == "flux"
    turbo = write_header_only(_mmdit(1536), tmp_path / "sd3-medium-turbo-merge.safetensors")
    assert guess_family(str(turbo)).name == "sd3-turbo"


def test_an_sd3_file_without_its_text_encoders_is_refused_with_a_sentence(
    settings: Settings, no_network: None, tmp_path: Path
) -> None:
    """Stability ships SD 3 medium with the CLIP encoders but not T5 (``incl_clips``), and
    SD 3.5 as the transformer and autoencoder alone: diffusers would look for the missing
    encoders' weights in the config folder, so each is refused before any loading."""
    shapes = _shapes(sd3_state_dict(full_size("sd3-medium")))
    without_t5 = {key: shape for key, shape in shapes.items() if ".t5xxl." not in key}
    clips = write_header_only(without_t5, tmp_path / "sd3_medium_incl_clips.safetensors")
    alone = {key: shape for key, shape in shapes.items() if not key.startswith("text_encoders.")}
    bare = write_header_only(alone, tmp_path / "sd3_medium.safetensors")
    for checkpoint, sentence in (
        (clips, "but not the T5 encoder .* that Imagine reads prompts with; use the version"),
        (bare, "without the autoencoder and text encoders that generating needs"),
    ):
        with pytest.raises(ConfigError, match=sentence):
            describe_single_file(checkpoint, settings)
        with pytest.raises(ConfigError, match=sentence):
            load_model(settings, str(checkpoint))
