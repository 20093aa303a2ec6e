"""``imagine db …`` end to end, as a user runs it, on both databases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import URL

from migrations.runner import head_revision

IMAGINE = Path(sys.executable).parent / "imagine"


def run_imagine(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    return subprocess.run(
        [str(IMAGINE), *args], env=clean | env, capture_output=True, text=True, timeout=120
    )


def test_upgrade_creates_the_sqlite_database_in_an_empty_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    env = {"IMAGINE_DATA_DIR": str(data_dir)}
    before = run_imagine("db", "current", env=env)
    assert before.returncode == 0, before.stderr
    assert "run `imagine db upgrade`" in before.stdout

    upgraded = run_imagine("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (data_dir / "imagine.db").is_file()
    current = run_imagine("db", "current", env=env)
    assert f"{head_revision()} (head)" in current.stdout


def test_upgrade_and_current_on_the_configured_url(database_url: URL, tmp_path: Path) -> None:
    env = {
        "IMAGINE_DATABASE_URL": database_url.render_as_string(hide_password=False),
        "IMAGINE_DATA_DIR": str(tmp_path),
    }
    assert run_imagine("db", "upgrade", env=env).returncode == 0
    current = run_imagine("db", "current", env=env)
    assert current.returncode == 0, current.stderr
    assert f"{head_revision()} (head)" in current.stdout
    down = run_imagine("db", "downgrade", "base", env=env)
    assert "empty" in down.stdout


def test_unreachable_database_is_one_sentence_not_a_traceback(tmp_path: Path) -> None:
    env = {
        "IMAGINE_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/imagine",
        "IMAGINE_DATA_DIR": str(tmp_path),
    }
    result = run_imagine("db", "current", env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("imagine: Cannot reach PostgreSQL at 127.0.0.1:1")
    assert "IMAGINE_DATABASE_URL" in result.stderr
    assert result.stderr.count("\n") == 1


def test_malformed_url_is_one_sentence(tmp_path: Path) -> None:
    env = {"IMAGINE_DATABASE_URL": "::nonsense::", "IMAGINE_DATA_DIR": str(tmp_path)}
    result = run_imagine("db", "upgrade", env=env)
    assert result.returncode == 2
    assert "is not a database URL" in result.stderr and "Traceback" not in result.stderr


def test_python_dash_m_runs_the_same_command(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "db", "current"],
        env=clean | {"IMAGINE_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "imagine.db" in result.stdout
