"""Settings: environment over TOML, embedded defaults, one clear sentence on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.deployment import resolve_mode
from storage.database import Database, parse_database_url
from storage.errors import ConfigError
from storage.settings import load_settings


def test_defaults_are_the_embedded_mode(clean_env: Path) -> None:
    settings = load_settings()
    assert settings.data_dir == clean_env
    assert resolve_mode(settings) == "embedded"
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{clean_env / 'imagine.db'}"
    assert settings.resolved_blob_dir == clean_env / "blobs"


def test_postgres_url_switches_to_scaled_mode(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGINE_DATABASE_URL", "postgresql+asyncpg://u:p@db:5432/imagine")
    settings = load_settings()
    assert resolve_mode(settings) == "scaled"
    assert parse_database_url(settings.resolved_database_url).drivername == "postgresql+asyncpg"


def test_toml_file_is_read_and_environment_wins(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "custom.toml"
    config.write_text('model = "tiny"\nmax_queued_per_user = 3\ndevice = "cpu"\n')
    monkeypatch.setenv("IMAGINE_CONFIG", str(config))
    monkeypatch.setenv("IMAGINE_DEVICE", "cuda:1")
    settings = load_settings()
    assert settings.model == "tiny"
    assert settings.max_queued_per_user == 3
    assert settings.device == "cuda:1"


def test_imagine_toml_in_the_working_folder_is_found(clean_env: Path) -> None:
    Path("imagine.toml").write_text('model = "from-the-folder"\n')
    assert load_settings().model == "from-the-folder"


def test_discord_token_is_read_from_discord_token(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "abc.def.ghi")
    settings = load_settings()
    assert settings.discord_token == "abc.def.ghi"
    assert "abc.def.ghi" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("IMAGINE_MAX_QUEUED_PER_USER", "lots", r"max_queued_per_user \(IMAGINE_MAX_QUEUED"),
        ("IMAGINE_DTYPE", "float8", r"dtype \(IMAGINE_DTYPE\)"),
        ("IMAGINE_CONFIG", "/nonexistent/imagine.toml", "not a file"),
    ],
)
def test_bad_values_get_one_sentence(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=expected) as refused:
        load_settings()
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("sixteen", r"IMAGINE_LORA_SLOT_RANK\) is invalid: .*'sixteen' is neither auto nor a rank"),
        ("0", r"'0' is neither auto nor a rank of 1 or more"),
        ("128", r"128 is above IMAGINE_LORA_MAX_RANK \(64\); set a rank of at most 64"),
    ],
)
def test_a_bad_slot_rank_says_what_to_write(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("IMAGINE_LORA_SLOT_RANK", value)
    with pytest.raises(ConfigError, match=expected) as refused:
        load_settings()
    assert "\n" not in str(refused.value)


def test_the_slot_rank_is_auto_or_a_number_within_the_max_rank(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert load_settings().fixed_slot_rank is None  # auto by default
    config = tmp_path / "ranks.toml"
    config.write_text("lora_max_rank = 128\nlora_slot_rank = 96\n")  # TOML's number
    monkeypatch.setenv("IMAGINE_CONFIG", str(config))
    assert load_settings().fixed_slot_rank == 96
    monkeypatch.setenv("IMAGINE_LORA_SLOT_RANK", " Auto ")
    assert load_settings().fixed_slot_rank is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "is not a database URL"),
        ("mysql://u@h/db", "does not support"),
        ("sqlite+aiosqlite://", "must name a SQLite file"),
        ("sqlite:///:memory:", "must name a SQLite file"),
        ("postgresql://u@h:5432", "names no database"),
    ],
)
def test_malformed_database_urls_say_what_to_fix(url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_database_url(url)


def test_plain_driver_names_get_the_async_driver() -> None:
    assert parse_database_url("postgresql://u@h/db").drivername == "postgresql+asyncpg"
    assert parse_database_url("postgres://u@h/db").drivername == "postgresql+asyncpg"
    assert parse_database_url("sqlite:////tmp/x.db").drivername == "sqlite+aiosqlite"


def test_unwritable_data_dir_names_the_setting(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    monkeypatch.setenv("IMAGINE_DATA_DIR", str(blocker / "data"))
    with pytest.raises(ConfigError, match=r"not writable.*IMAGINE_DATA_DIR"):
        Database.from_settings(load_settings())
