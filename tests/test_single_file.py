"""Civitai files, offline: single-file checkpoints in the original layout and kohya LoRAs.

The tiny models are written in the layouts people download (tests/original_layout.py)
and loaded back with no network: they must give the images of the diffusers folders
they came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bot.cli.doctor import check_model
from generation.flux_checkpoint import convert_flux_transformer, flux_transformer_config
from generation.loading import LoadedModel, load_model
from generation.lora import LoraSet, check_lora_fits
from generation.single_file import (
    CONFIGS,
    clip_tokenizers,
    describe_single_file,
    flux_components,
    t5_tokenizer,
)
from generation.styles import StyleError, StyleSpec, parse_style
from generation.tiny import build_tiny_lora
from storage.checkpoints import CHECKPOINT_FAMILIES, detect_checkpoint
from storage.errors import ConfigError
from storage.families import guess_family
from storage.settings import Settings
from storage.style_store import StyleRefused, check_family, inspect_lora
from tests.original_layout import (
    flux_state_dict,
    original_state_dict,
    sd3_state_dict,
    write_flux_single_file,
    write_header_only,
    write_kohya_lora,
    write_sd3_single_file,
    write_single_file,
)
from tests.test_styles import write_style

FAMILY = {"tiny": "tiny-sd", "tiny-sdxl": "tiny-sdxl"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        data_dir=tmp_path_factory.mktemp("single-file-data"), device="cpu", allow_downloads=False
    )


@pytest.fixture(scope="module")
def folder_models(settings: Settings) -> dict[str, LoadedModel]:
    return {name: load_model(settings, name) for name in FAMILY}


def render(pipe: Any, seed: int = 3) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    result = pipe(
        "a lighthouse at dusk",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    )
    return np.asarray(result.images[0])


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_single_file_checkpoint_loads_offline_and_draws_what_its_folder_draws(
    name: str,
    settings: Settings,
    folder_models: dict[str, LoadedModel],
    no_network: None,
    tmp_path: Path,
) -> None:
    folder = folder_models[name]
    checkpoint = write_single_file(folder.pipe, tmp_path / f"{name}-civitai.safetensors")
    assert any(key.startswith("model.diffusion_model.") for key in original_state_dict(folder.pipe))

    # The bot, which never loads a model, reads the family from the file's header.
    assert guess_family(str(checkpoint)).name == FAMILY[name]
    loaded = load_model(settings, str(checkpoint))

    assert loaded.source.kind == "single_file"
    assert loaded.family.name == FAMILY[name]
    assert type(loaded.pipe) is type(folder.pipe)
    difference = np.abs(render(loaded.pipe) - render(folder.pipe)).max()
    assert difference <= 1 / 255


def test_the_cli_generates_from_a_civitai_file_with_hub_offline_and_an_empty_hf_home(
    folder_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    from generation.metadata import read_recipe

    checkpoint = write_single_file(folder_models["tiny"].pipe, tmp_path / "civitai.safetensors")
    hf_home = tmp_path / "empty-hf-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGINE_", "HF_"))}
    env |= {
        "IMAGINE_DATA_DIR": str(tmp_path / "data"),
        "IMAGINE_MODEL": str(checkpoint),
        "IMAGINE_DEVICE": "cpu",
        "IMAGINE_ALLOW_DOWNLOADS": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(hf_home),
    }
    root = Path(__file__).resolve().parents[1]  # this checkout's code, not an installed one
    env["PYTHONPATH"] = str(root)
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "generate", "a lighthouse --seed 7 --steps 2"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    recipe = read_recipe(Path(result.stdout.strip().splitlines()[-1]).read_bytes())
    assert recipe.model == str(checkpoint)
    assert recipe.model_hash == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert [path for path in hf_home.rglob("*") if path.is_file()] == []


def _meta_pipe(family: str) -> Any:
    """The family's shipped configs as a model on the meta device: shapes, no weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIGS / family
    with torch.device("meta"):
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": None,
        }
        if (folder / "text_encoder_2").is_dir():
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            )
    return type("MetaPipe", (), parts)()


# Shapes of well-known tensors of the released SD 1.5 and SDXL base checkpoints.
REAL_SHAPES = {
    "sd15": {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": [320, 640, 1, 1],
        "model.diffusion_model.middle_block.1.proj_in.weight": [1280, 1280, 1, 1],
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
        "first_stage_model.encoder.mid.attn_1.q.weight": [512, 512, 1, 1],
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": [1280, 2816],
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": [
            1280,
            2048,
        ],
        "model.diffusion_model.output_blocks.2.2.conv.weight": [1280, 1280, 3, 3],
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": [
            768,
            3072,
        ],
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": [3840, 1280],
        "conditioner.embedders.1.model.text_projection": [1280, 1280],
    },
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_shipped_configs_have_the_shapes_of_the_released_checkpoints(family: str) -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state = original_state_dict(_meta_pipe(family))
    shapes = {key: list(tensor.shape) for key, tensor in state.items()}
    for key, shape in REAL_SHAPES[family].items():
        assert shapes.get(key) == shape, key
    assert detect_checkpoint(Path("x.safetensors"), shapes).family == family
    assert infer_diffusers_model_type(state) == {"sd15": "v1", "sdxl": "xl_base"}[family]


def test_a_real_checkpoint_without_a_tokenizer_vocabulary_says_what_to_provide(
    settings: Settings, no_network: None, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "dreamshaper.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (
                torch.zeros(77, 8)
            ),
        },
        str(checkpoint),
    )
    with pytest.raises(ConfigError) as refused:
        load_model(settings, str(checkpoint))
    message = str(refused.value)
    assert "sd15 checkpoint needs the CLIP tokenizer's vocabulary" in message
    assert "IMAGINE_CLIP_TOKENIZER" in message
    assert guess_family(str(checkpoint)).name == "sd15"
    doctor = check_model(settings.model_copy(update={"model": str(checkpoint)}))
    assert doctor.status == "FAIL" and doctor.detail == message


def test_an_inpainting_checkpoint_is_refused_with_a_sentence(tmp_path: Path) -> None:
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3]}
    with pytest.raises(ConfigError, match="inpainting checkpoint"):
        detect_checkpoint(tmp_path / "inpaint.safetensors", shapes)


def test_the_tokenizer_setting_gives_each_tokenizer_its_own_special_tokens(
    settings: Settings, folder_models: dict[str, LoadedModel]
) -> None:
    vocabulary = folder_models["tiny"].source.path / "tokenizer"
    chosen = settings.model_copy(update={"clip_tokenizer": vocabulary})
    sdxl = next(entry for entry in CHECKPOINT_FAMILIES if entry.family == "sdxl")
    tokenizers = clip_tokenizers(sdxl, CONFIGS / "sdxl", chosen)
    assert tokenizers["tokenizer"].pad_token == "<|endoftext|>"
    assert tokenizers["tokenizer_2"].pad_token == "!"  # as in SDXL's second tokenizer
    assert tokenizers["tokenizer"].model_max_length == 77
    missing = settings.model_copy(update={"clip_tokenizer": vocabulary.parent / "nothing"})
    with pytest.raises(ConfigError, match=r"holds no vocab\.json and merges\.txt"):
        clip_tokenizers(sdxl, CONFIGS / "sdxl", missing)


# -- LoRAs ---------------------------------------------------------------------------------


def _style(folder: Path, name: str, lora: Path, family: str) -> StyleSpec:
    return parse_style(write_style(folder, name, lora.name, base_model_family=family))


def styled_renders(pipe: Any, styles: list[StyleSpec]) -> list[np.ndarray]:
    """:func:`render` with each style in turn; the pipeline is left as it was."""
    loras = LoraSet(pipe, capacity=len(styles))
    try:
        renders = []
        for style in styles:
            loras.activate([(style, 1.0)])
            renders.append(render(pipe))
        return renders
    finally:
        loras.activate([])
        for adapter in loras.resident:
            pipe.delete_adapters(adapter)


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_kohya_lora_changes_the_image_as_the_same_lora_in_peft_form_does(
    name: str, folder_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    pipe = folder_models[name].pipe
    peft_file = build_tiny_lora(pipe.unet, tmp_path / "peft.safetensors", seed=5)
    kohya_file = write_kohya_lora(
        load_file(str(peft_file)), pipe.unet.config, tmp_path / "kohya.safetensors"
    )
    kohya_keys = list(load_file(str(kohya_file)))
    assert all(key.startswith("lora_unet_") for key in kohya_keys)
    if name == "tiny-sdxl":  # kohya names SDXL layers after the original UNet
        assert any("_input_blocks_" in key for key in kohya_keys)
    family = FAMILY[name]
    peft_style = _style(tmp_path, "peftstyle", peft_file, family)
    kohya_style = _style(tmp_path, "kohyastyle", kohya_file, family)
    assert check_lora_fits(pipe, kohya_style).layers.keys() == (
        check_lora_fits(pipe, peft_style).layers.keys()
    )

    plain = render(pipe)
    with_peft, with_kohya = styled_renders(pipe, [peft_style, kohya_style])
    assert np.abs(with_kohya - plain).max() > 0.01
    assert np.abs(with_kohya - with_peft).max() <= 1 / 255


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_kohya_lora_that_also_trains_the_text_encoder_loads_and_uses_it(
    name: str, folder_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    """Most LoRAs people download change the text encoder too (``lora_te_text_model_…``)."""
    from safetensors.torch import load_file

    pipe = folder_models[name].pipe
    unet_state = load_file(str(build_tiny_lora(pipe.unet, tmp_path / "unet.safetensors", seed=5)))
    text = pipe.text_encoder.config
    generator = torch.Generator().manual_seed(6)
    both = dict(unet_state)
    for layer in range(text.num_hidden_layers):
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):  # as kohya trains
            key = f"text_encoder.text_model.encoder.layers.{layer}.self_attn.{projection}"
            shapes = {"A": (4, text.hidden_size), "B": (text.hidden_size, 4)}
            for half, shape in shapes.items():
                both[f"{key}.lora_{half}.weight"] = torch.randn(shape, generator=generator)
    kohya_file = write_kohya_lora(both, pipe.unet.config, tmp_path / "kohya.safetensors")
    assert any(
        key.startswith(("lora_te_text_model_", "lora_te1_text_model_"))
        for key in load_file(str(kohya_file))
    )
    family = FAMILY[name]
    unet_only = _style(tmp_path, "unetonly", tmp_path / "unet.safetensors", family)
    with_text = _style(tmp_path, "withtext", kohya_file, family)
    layers = check_lora_fits(pipe, with_text).layers
    assert {component for component, _, _ in layers} == {"unet", "text_encoder"}

    without, changed = styled_renders(pipe, [unet_only, with_text])
    assert np.abs(changed - without).max() > 0.01  # the text encoder's layers count


def _loha(path: Path) -> Path:
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {
            f"{name}.hada_w1_a": torch.zeros(32, 4),
            f"{name}.hada_w1_b": torch.zeros(4, 32),
            f"{name}.hada_w2_a": torch.zeros(32, 4),
            f"{name}.hada_w2_b": torch.zeros(4, 32),
            f"{name}.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    return path


def test_lycoris_corrupt_and_misfit_loras_are_refused_with_sentences(
    folder_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    sd, sdxl = folder_models["tiny"].pipe, folder_models["tiny-sdxl"].pipe
    loha = _style(tmp_path, "loha", _loha(tmp_path / "loha.safetensors"), "tiny-sd")
    with pytest.raises(StyleError, match="is a LyCORIS LoHa file, a format diffusers cannot"):
        check_lora_fits(sd, loha)
    with pytest.raises(StyleRefused, match="LyCORIS LoHa"):
        inspect_lora((tmp_path / "loha.safetensors").read_bytes(), "loha.safetensors", 2**20)

    peft_file = build_tiny_lora(sd.unet, tmp_path / "good.safetensors", seed=6)
    kohya = write_kohya_lora(load_file(str(peft_file)), sd.unet.config, tmp_path / "k.safetensors")
    data = kohya.read_bytes()
    info = inspect_lora(data, "k.safetensors", 2**20)
    check_family(info, "tiny-sd", "k.safetensors")  # kohya keys are read at /style add too
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StyleError, match="damaged or cut short"):
        check_lora_fits(sd, _style(tmp_path, "cut", cut, "tiny-sd"))
    with pytest.raises(StyleRefused, match="damaged or cut short"):
        inspect_lora(cut.read_bytes(), "cut.safetensors", 2**20)

    with pytest.raises(StyleError, match=r"kohya/A1111 layout\) does not fit the loaded model"):
        check_lora_fits(sdxl, _style(tmp_path, "kohyasd", kohya, "tiny-sd"))


# -- SD3 and FLUX ----------------------------------------------------------------------------


def test_a_tiny_sd3_checkpoint_in_stabilitys_layout_loads_offline_and_draws_what_its_folder_draws(
    settings: Settings, no_network: None, tmp_path: Path
) -> None:
    folder = load_model(settings, "tiny-sd3")
    checkpoint = write_sd3_single_file(folder.pipe, tmp_path / "sd35-civitai.safetensors")
    assert any(
        key.startswith("model.diffusion_model.joint_blocks.") for key in sd3_state_dict(folder.pipe)
    )

    assert guess_family(str(checkpoint)).name == "tiny-sd3"
    loaded = load_model(settings, str(checkpoint))

    assert loaded.source.kind == "single_file"
    assert loaded.family.name == "tiny-sd3"
    assert type(loaded.pipe) is type(folder.pipe)
    difference = np.abs(render(loaded.pipe) - render(folder.pipe)).max()
    assert difference <= 1 / 255


# Shapes of tensors that tell the released SD3 and FLUX checkpoints apart.
_PREFIX = "model.diffusion_model."
SD3_FLUX_SHAPES = {
    "sd3": {  # SD 3.5 medium, all in one
        _PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": [4608, 1536],
        _PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight": [4608, 1536],
        _PREFIX + "x_embedder.proj.weight": [1536, 16, 2, 2],
        "first_stage_model.decoder.conv_in.weight": [512, 16, 3, 3],
        "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": [
            77,
            768,
        ],
    },
    "flux": {  # FLUX.1-dev as Black Forest Labs ships it: the transformer alone
        "double_blocks.0.img_attn.qkv.weight": [9216, 3072],
        "guidance_in.in_layer.weight": [3072, 256],
        "img_in.weight": [3072, 64],
    },
    "flux-schnell": {
        _PREFIX + "double_blocks.0.img_attn.qkv.weight": [9216, 3072],
        _PREFIX + "img_in.weight": [3072, 64],
        "vae.decoder.conv_in.weight": [512, 16, 3, 3],
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": [768],
        "text_encoders.t5xxl.transformer.shared.weight": [32128, 4096],
    },
}


@pytest.mark.parametrize("family", list(SD3_FLUX_SHAPES))
def test_real_sd3_and_flux_checkpoints_are_told_apart_by_their_keys(
    family: str, tmp_path: Path
) -> None:
    entry = detect_checkpoint(tmp_path / "model.safetensors", SD3_FLUX_SHAPES[family])
    assert entry.family == family
    folder = CONFIGS / (entry.configs or entry.family)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == entry.pipeline
    width = SD3_FLUX_SHAPES[family][
        next(key for key in SD3_FLUX_SHAPES[family] if key.endswith(entry.width_key))
    ][0]
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    assert transformer["num_attention_heads"] * transformer["attention_head_dim"] == width
    assert transformer.get("guidance_embeds", False) == (family == "flux")


def test_a_transformer_only_flux_file_and_a_missing_t5_tokenizer_are_refused_with_sentences(
    settings: Settings, no_network: None, tmp_path: Path
) -> None:
    flux_only = tmp_path / "flux1-dev.safetensors"
    save_file(
        {key: torch.zeros(shape) for key, shape in SD3_FLUX_SHAPES["flux"].items()},
        str(flux_only),
    )
    assert guess_family(str(flux_only)).name == "flux"
    with pytest.raises(ConfigError, match="holds the flux transformer alone") as refused:
        load_model(settings, str(flux_only))
    assert "Set IMAGINE_SINGLE_FILE_COMPONENTS to a FLUX.1 diffusers folder" in str(refused.value)
    doctor = check_model(settings.model_copy(update={"model": str(flux_only)}))
    assert doctor.status == "FAIL" and doctor.detail == str(refused.value)

    schnell = tmp_path / "schnell-aio.safetensors"
    write_header_only(SD3_FLUX_SHAPES["flux-schnell"], schnell)
    vocabulary = load_model(settings, "tiny").source.path / "tokenizer"
    chosen = settings.model_copy(update={"clip_tokenizer": vocabulary})
    with pytest.raises(ConfigError, match="IMAGINE_T5_TOKENIZER") as refused:
        describe_single_file(schnell, chosen)
    assert "needs the T5 tokenizer" in str(refused.value)

    # An all-in-one file without its T5 encoder: the same sentence from doctor and loading.
    no_t5 = tmp_path / "schnell-no-t5.safetensors"
    shapes = {k: v for k, v in SD3_FLUX_SHAPES["flux-schnell"].items() if "t5xxl" not in k}
    write_header_only(shapes, no_t5)
    with pytest.raises(ConfigError, match=r"but not the T5 encoder \(text_encoders\.t5xxl"):
        describe_single_file(no_t5, chosen)
    with pytest.raises(ConfigError, match=r"but not the T5 encoder \(text_encoders\.t5xxl"):
        load_model(chosen, str(no_t5))


def test_the_components_setting_names_a_flux_folder_or_is_refused_with_a_sentence(
    settings: Settings, no_network: None
) -> None:
    dev = next(entry for entry in CHECKPOINT_FAMILIES if entry.family == "flux")
    assert flux_components(dev, settings) is None  # nothing cached, nothing set
    tiny_flux = load_model(settings, "tiny-flux").source.path
    chosen = settings.model_copy(update={"single_file_components": str(tiny_flux)})
    assert flux_components(dev, chosen) == tiny_flux
    sd = settings.model_copy(update={"single_file_components": str(tiny_flux.parent / "tiny-sd")})
    load_model(settings, "tiny")
    with pytest.raises(ConfigError, match=r"IMAGINE_SINGLE_FILE_COMPONENTS is .* neither a FLUX"):
        flux_components(dev, sd)
    hub_id = settings.model_copy(update={"single_file_components": "someone/not-cached"})
    with pytest.raises(ConfigError, match="nor such a model in the Hugging Face cache"):
        flux_components(dev, hub_id)


FLUX_LAYOUTS = {"bfl": "", "comfy": _PREFIX, "all-in-one": _PREFIX}


@pytest.mark.parametrize("layout", list(FLUX_LAYOUTS))
def test_a_tiny_flux_file_in_black_forest_labs_layout_loads_offline_and_draws_what_its_folder_draws(
    layout: str, settings: Settings, no_network: None, tmp_path: Path
) -> None:
    folder = load_model(settings, "tiny-flux")
    checkpoint = write_flux_single_file(
        folder.pipe.transformer,
        tmp_path / "flux1-tiny.safetensors",
        FLUX_LAYOUTS[layout],
        pipe=folder.pipe if layout == "all-in-one" else None,
    )
    keys = set(flux_state_dict(folder.pipe.transformer))
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"} <= keys
    assert "guidance_in.in_layer.weight" in keys and "final_layer.linear.weight" in keys

    assert guess_family(str(checkpoint)).name == "tiny-flux"
    assert "loadable offline" in describe_single_file(checkpoint, settings)
    loaded = load_model(settings, str(checkpoint))

    assert loaded.source.kind == "single_file"
    assert loaded.family.name == "tiny-flux"
    assert type(loaded.pipe) is type(folder.pipe)
    assert loaded.pipe.transformer.config.guidance_embeds is True
    for name in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads"):
        assert loaded.pipe.transformer.config[name] == folder.pipe.transformer.config[name]
    difference = np.abs(render(loaded.pipe) - render(folder.pipe)).max()
    assert difference <= 1 / 255


def test_a_flux_file_without_guidance_in_is_schnell_shaped_and_draws_as_its_transformer(
    settings: Settings, no_network: None, tmp_path: Path
) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    folder = load_model(settings, "tiny-flux")
    config = dict(folder.pipe.transformer.config) | {"guidance_embeds": False}
    torch.manual_seed(4)
    schnell = FluxTransformer2DModel.from_config(config).eval()
    checkpoint = write_flux_single_file(schnell, tmp_path / "schnell-tiny.safetensors")
    assert not any("guidance" in key for key in flux_state_dict(schnell))

    loaded = load_model(settings, str(checkpoint))
    assert loaded.pipe.transformer.config.guidance_embeds is False
    reference: Any = FluxPipeline(**(folder.pipe.components | {"transformer": schnell}))
    reference.set_progress_bar_config(disable=True)
    difference = np.abs(render(loaded.pipe) - render(reference)).max()
    assert difference <= 1 / 255
    assert np.abs(render(loaded.pipe) - render(folder.pipe)).max() > 0.01  # not dev's weights


def test_the_flux_renaming_agrees_with_diffusers_own_conversion(settings: Settings) -> None:
    """diffusers' converter fixes the width at FLUX.1's 3072, which only its split of the
    single blocks' fused projection depends on: every other tensor must land where ours puts
    it, and ours must split at the file's own width."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    transformer = load_model(settings, "tiny-flux").pipe.transformer
    original = flux_state_dict(transformer)
    shapes = {key: list(tensor.shape) for key, tensor in original.items()}
    config = flux_transformer_config(shapes, dict(transformer.config), "tiny")
    ours = convert_flux_transformer(original, config, "tiny")
    assert set(ours) == set(transformer.state_dict())
    for key, tensor in transformer.state_dict().items():
        assert torch.equal(ours[key], tensor), key

    at_flux_width = dict(original)
    for part in ("weight", "bias"):  # only the first dimension matters to the split
        at_flux_width[f"single_blocks.0.linear1.{part}"] = torch.zeros(7 * 3072)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(at_flux_width)
    fused = ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")
    assert set(theirs) == set(ours)
    for key, tensor in ours.items():
        if not (
            key.startswith("single_transformer_blocks.") and key.split(".", 2)[2].startswith(fused)
        ):
            assert torch.equal(theirs[key], tensor), key


@pytest.mark.parametrize("configs", ["flux-dev", "flux-schnell"])
def test_full_size_flux_1_files_read_back_to_the_shipped_configs(configs: str) -> None:
    """FLUX.1 at full size, on the meta device (shapes, no weights): the file written in
    Black Forest Labs' layout has the released tensors' shapes, is detected as its family,
    and converts back to the shipped config at width 3072."""
    from diffusers import FluxTransformer2DModel

    base = dict(FluxTransformer2DModel.load_config(CONFIGS / configs / "transformer"))
    with torch.device("meta"):
        transformer: Any = FluxTransformer2DModel.from_config(base)
    original = flux_state_dict(transformer)
    shapes = {key: list(tensor.shape) for key, tensor in original.items()}
    assert shapes["double_blocks.18.img_attn.qkv.weight"] == [9216, 3072]
    assert shapes["single_blocks.37.linear1.weight"] == [21504, 3072]
    assert shapes["double_blocks.0.img_attn.norm.query_norm.scale"] == [128]
    family = {"flux-dev": "flux", "flux-schnell": "flux-schnell"}[configs]
    assert detect_checkpoint(Path(f"{configs}.safetensors"), shapes).family == family
    config = flux_transformer_config(shapes, base, configs)
    for key, value in base.items():
        if not key.startswith("_"):
            assert config[key] == value, key
    assert set(convert_flux_transformer(original, config, configs)) == set(transformer.state_dict())


def test_a_cut_short_or_incomplete_flux_file_is_refused_with_a_sentence(
    settings: Settings, no_network: None, tmp_path: Path
) -> None:
    transformer = load_model(settings, "tiny-flux").pipe.transformer
    whole = write_flux_single_file(transformer, tmp_path / "whole.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"not a readable \.safetensors file .* cut short"):
        load_model(settings, str(cut))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ConfigError, match="its header is not JSON"):
        load_model(settings, str(garbage))

    state = flux_state_dict(transformer)
    missing = tmp_path / "missing.safetensors"
    save_file(
        {k: v for k, v in state.items() if k != "double_blocks.0.txt_mlp.2.weight"}, str(missing)
    )
    with pytest.raises(ConfigError, match="lacks the FLUX transformer tensor"):
        load_model(settings, str(missing))
    extra = tmp_path / "extra.safetensors"
    save_file(state | {"double_blocks.0.img_attn.lora.weight": torch.zeros(2)}, str(extra))
    with pytest.raises(ConfigError, match="holds tensors Imagine does not know"):
        load_model(settings, str(extra))
    misfit = tmp_path / "misfit.safetensors"
    save_file(state | {"single_blocks.0.linear1.weight": torch.zeros(100, 32)}, str(misfit))
    with pytest.raises(ConfigError, match="its sizes do not fit together"):
        load_model(settings, str(misfit))
    fill = tmp_path / "fill.safetensors"
    save_file(state | {"img_in.weight": torch.zeros(32, 384)}, str(fill))
    with pytest.raises(ConfigError, match="is a FLUX Fill, Canny or Depth model"):
        load_model(settings, str(fill))


def test_the_t5_tokenizer_setting_gives_the_family_its_sequence_length(
    settings: Settings,
) -> None:
    t5_folder = load_model(settings, "tiny-flux").source.path / "tokenizer_2"
    schnell = next(entry for entry in CHECKPOINT_FAMILIES if entry.family == "flux-schnell")
    chosen = settings.model_copy(update={"t5_tokenizer": t5_folder})
    tokenizer = t5_tokenizer(schnell, CONFIGS / "flux-schnell", chosen)["tokenizer_2"]
    assert tokenizer.model_max_length == 256
    assert tokenizer("a lighthouse").input_ids[-1] == tokenizer.eos_token_id
    missing = settings.model_copy(update={"t5_tokenizer": t5_folder.parent / "nothing"})
    with pytest.raises(ConfigError, match=r"holds no spiece\.model"):
        t5_tokenizer(schnell, CONFIGS / "flux-schnell", missing)
