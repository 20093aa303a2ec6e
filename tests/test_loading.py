"""Finding models: tiny, local folder, hub id from the cache, and clear refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from generation.loading import (
    ModelNotFound,
    load_model,
    model_hash,
    pick_device,
    pick_dtype,
    resolve_source,
)
from generation.tiny import ensure_tiny_model
from storage.errors import ConfigError
from storage.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", device="cpu", allow_downloads=False)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model("tiny", tmp_path_factory.mktemp("models"))


def test_a_local_diffusers_folder_loads_like_any_model(
    settings: Settings, tiny_folder: Path
) -> None:
    loaded = load_model(settings, str(tiny_folder))
    assert loaded.source.kind == "folder"
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline"
    assert loaded.family.name == "sd15"  # a 32-wide cross-attention is not SD 2's 1024
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert len(loaded.model_hash) == 10


def test_a_hub_id_resolves_from_the_local_cache_offline(
    settings: Settings, tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--imagine-tests--tiny-sd"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_source("imagine-tests/tiny-sd", settings)
    assert source.kind == "hub" and source.path == snapshot
    loaded = load_model(settings, "imagine-tests/tiny-sd")
    assert loaded.source.model == "imagine-tests/tiny-sd"


def test_a_missing_hub_model_says_where_it_looked_and_how_to_fix(settings: Settings) -> None:
    with pytest.raises(ModelNotFound) as missing:
        resolve_source("nobody/no-such-model", settings)
    message = str(missing.value)
    assert "'nobody/no-such-model'" in message
    assert "hf download nobody/no-such-model" in message
    assert "IMAGINE_MODEL" in message and "--model tiny" in message
    assert "looked in" in message


def test_a_missing_local_path_says_so(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"no \.safetensors file or diffusers folder"):
        resolve_source(str(tmp_path / "nothing-here"), settings)


def test_pickle_checkpoints_are_refused(settings: Settings, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickle checkpoint"):
        resolve_source(str(checkpoint), settings)


def test_a_single_file_that_is_no_sd_checkpoint_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "mystery.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(checkpoint))
    assert resolve_source(str(checkpoint), settings).kind == "single_file"
    with pytest.raises(ConfigError, match="not a Stable Diffusion"):
        load_model(settings, str(checkpoint))


def test_model_hash_is_cached_and_changes_with_the_weights(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({"w": torch.ones(3)}, str(weights))
    from generation.loading import ModelSource

    source = ModelSource("m", "folder", folder)
    first = model_hash(source, tmp_path / "cache")
    assert model_hash(source, tmp_path / "cache") == first
    assert (tmp_path / "cache" / "model-hashes.json").is_file()
    save_file({"w": torch.zeros(3)}, str(weights))
    assert model_hash(source, tmp_path / "cache") != first


def test_device_and_dtype_choice() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) in {torch.bfloat16, torch.float16}
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ConfigError, match="not a torch device"):
        pick_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA GPU"):
            pick_device("cuda")


def test_workers_starting_together_build_the_tiny_model_once(tmp_path: Path) -> None:
    """Each process loads a whole folder: none deletes one another process is loading."""
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from diffusers import AutoPipelineForText2Image; "
        "from generation.tiny import ensure_tiny_model; "
        "folder = ensure_tiny_model('tiny', Path(sys.argv[1])); "
        "AutoPipelineForText2Image.from_pretrained(str(folder)); print('loaded')"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [process.communicate(timeout=240) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], results
    assert [out.strip() for out, _ in results] == ["loaded"] * 3
    assert sorted(path.name for path in tmp_path.iterdir()) == [".tiny-sd.lock", "tiny-sd"]


def test_a_folder_imagine_cannot_run_is_refused_at_load(
    settings: Settings, tiny_folder: Path, tmp_path: Path
) -> None:
    """Not quietly taken for SD 1.5: every job would fail (an inpainting UNet's 9 input
    channels) or run with another pipeline's defaults."""
    import json

    from diffusers import UNet2DConditionModel

    inpainting = tmp_path / "tiny-inpainting"
    shutil.copytree(tiny_folder, inpainting)
    unet = UNet2DConditionModel.from_pretrained(str(tiny_folder / "unet"))
    UNet2DConditionModel.from_config({**unet.config, "in_channels": 9}).save_pretrained(
        str(inpainting / "unet")
    )
    index = json.loads((inpainting / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (inpainting / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="its UNet takes 9 channels, not its autoencoder's 4"):
        load_model(settings, str(inpainting))

    other = tmp_path / "tiny-lcm"
    shutil.copytree(tiny_folder, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "LatentConsistencyModelPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="LatentConsistencyModelPipeline, which Imagine does not"):
        load_model(settings, str(other))
