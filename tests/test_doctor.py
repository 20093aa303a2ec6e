"""``imagine doctor`` on a fresh machine, and what it says when something is wrong."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from bot.cli import main
from tests.conftest import migrated_database

TOKEN = (
    base64.b64encode(b"123456789012345678").decode().rstrip("=")
    + ".GabCde.abcdefghijklmnopqrstuvwxyz012"
)


def lines(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    out = capsys.readouterr().out
    result = {}
    for line in out.splitlines():
        status, _, rest = line.strip().partition("  ")
        name, _, detail = rest.partition(": ")
        result[name] = f"{status} {detail}"
    return result


def test_a_fresh_machine_with_the_tiny_model_fails_only_the_token(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGINE_MODEL", "tiny")
    monkeypatch.setenv("IMAGINE_DEVICE", "cpu")
    assert main(["doctor"]) == 1
    checks = lines(capsys)
    assert set(checks) == {
        "discord token",
        "database",
        "blob store",
        "disk",
        "gpu",
        "compile",
        "model",
        "memory",
        "styles",
    }
    assert checks["compile"].startswith("ok off: auto compiles only on CUDA")
    assert checks["memory"].startswith("ok") and "GiB of weights in cpu memory" in checks["memory"]
    failed = {name for name, text in checks.items() if text.startswith("FAIL")}
    assert failed == {"discord token"}
    assert "export DISCORD_TOKEN" in checks["discord token"]

    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    assert main(["doctor"]) == 0
    assert lines(capsys)["discord token"].startswith("ok")


def test_a_style_for_another_family_and_a_malformed_token_fail(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    styles = clean_env / "styles"
    styles.mkdir(parents=True)
    (styles / "xl.safetensors").write_bytes(b"")
    (styles / "xl.toml").write_text(
        'name = "xl"\nlora = "xl.safetensors"\nbase_model_family = "sdxl"\n'
    )
    monkeypatch.setenv("IMAGINE_MODEL", "tiny")
    monkeypatch.setenv("IMAGINE_DEVICE", "cpu")
    monkeypatch.setenv("DISCORD_TOKEN", "hello")
    assert main(["doctor"]) == 1
    checks = lines(capsys)
    assert checks["styles"].startswith("FAIL") and "sdxl" in checks["styles"]
    assert checks["discord token"].startswith("FAIL") and "shape" in checks["discord token"]


async def test_a_scaled_database_behind_its_schema_fails_with_the_fix(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    from migrations import runner

    async with migrated_database("postgresql", tmp_path, request) as database:
        await runner.downgrade(database, "0003")
        url = database.url.render_as_string(hide_password=False)
        monkeypatch.setenv("IMAGINE_DATABASE_URL", url)
        from bot.cli.doctor import run_checks
        from storage.settings import Settings

        checks = {check.name: check for check in await run_checks(Settings(), quick=True)}
    assert checks["database"].status == "FAIL"
    assert "imagine db upgrade" in checks["database"].detail
