"""What a new user runs into on the command line: one sentence, a non-zero exit, no traceback,
and no row left in a wrong state."""

from __future__ import annotations

import base64
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from bot.cli import main

TOKEN = (
    base64.b64encode(b"123456789012345678").decode().rstrip("=")
    + ".GabCde.abcdefghijklmnopqrstuvwxyz012"
)


def imagine(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    """``python -m bot.cli`` with only ``env``'s IMAGINE_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    clean.pop("DISCORD_TOKEN", None)
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", *args],
        env=clean | {"HF_HUB_OFFLINE": "1"} | env,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )


def one_sentence(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("imagine: ")]
    assert len(lines) == 1, err
    return lines[0]


def no_generation_made(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "1"]) == 2
    assert "no generation 1" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint"])
def test_a_corrupt_or_empty_safetensors_model_is_one_sentence(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
) -> None:
    checkpoint = clean_env.parent / "model.safetensors"
    checkpoint.write_bytes(content)
    monkeypatch.setenv("IMAGINE_MODEL", str(checkpoint))
    monkeypatch.setenv("IMAGINE_DEVICE", "cpu")
    assert main(["generate", "a cat"]) == 2
    sentence = one_sentence(capsys)
    assert str(checkpoint) in sentence and "not a readable .safetensors file" in sentence
    no_generation_made(capsys)


def test_a_cut_short_safetensors_checkpoint_is_one_sentence(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from safetensors.torch import save_file

    checkpoint = clean_env.parent / "cut.safetensors"
    save_file({"model.diffusion_model.w": torch.zeros(1000)}, str(checkpoint))
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    monkeypatch.setenv("IMAGINE_MODEL", str(checkpoint))
    monkeypatch.setenv("IMAGINE_DEVICE", "cpu")
    assert main(["generate", "a cat"]) == 2
    assert "not a readable .safetensors file" in one_sentence(capsys)
    no_generation_made(capsys)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("folder", "is a folder"),
        ("file/image.png", "is a file, not a folder"),
        ("image.gif", "use .png, .jpg, .jpeg, .webp"),
        ("image", "use .png, .jpg, .jpeg, .webp"),
    ],
)
def test_an_unusable_out_is_refused_before_anything_runs(
    clean_env: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
    expected: str,
) -> None:
    (clean_env.parent / "folder").mkdir()
    (clean_env.parent / "file").write_text("a file where a folder should be")
    out = clean_env.parent / where
    assert main(["generate", "a cat --steps 1", "--model", "tiny", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "loading" not in captured.err  # refused before the model loads
    assert "Traceback" not in captured.err
    assert expected in captured.err and "--out" in captured.err
    no_generation_made(capsys)


@pytest.mark.parametrize(("suffix", "image_format"), [(".jpg", "JPEG"), (".webp", "WEBP")])
def test_out_writes_the_format_its_suffix_names_with_the_parameters(
    clean_env: Path, capsys: pytest.CaptureFixture[str], suffix: str, image_format: str
) -> None:
    out = clean_env.parent / "new folder" / f"grid{suffix}"
    assert main(["generate", "a cat --steps 1 --seed 5", "--model", "tiny", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == image_format
        assert image.mode == "RGB"
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0")
    assert "Seed: 5" in comment[8:].decode("utf-16-be")


@pytest.mark.parametrize("action", ["upgrade", "downgrade"])
def test_an_unknown_revision_names_the_known_ones(
    clean_env: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    assert main(["db", action, "bogusrev"]) == 2
    sentence = one_sentence(capsys)
    assert "'bogusrev'" in sentence
    assert "0001" in sentence and "`head`" in sentence and "`base`" in sentence


@pytest.mark.parametrize("command", ["show", "status", "cancel", "reroll"])
def test_an_id_past_the_database_s_keys_is_one_sentence(
    clean_env: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert main([command, "99999999999999999999"]) == 2
    assert (
        one_sentence(capsys)
        == "imagine: There is no generation 99999999999999999999; check the id."
    )


def test_a_malformed_config_file_names_its_line_and_column(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = clean_env.parent / "imagine.toml"  # clean_env works in this folder
    config.write_text('model = "tiny"\ndevice = cpu\n')
    assert main(["show", "1"]) == 2
    sentence = one_sentence(capsys)
    assert str(config.resolve()) in sentence
    assert "line 2, column 10" in sentence

    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  settings:" in out and "line 2, column 10" in out


def test_the_bot_without_network_says_it_cannot_reach_discord(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import discord.http

    # Port 9 on this machine: refused at once, and nothing leaves the machine.
    monkeypatch.setattr(discord.http.Route, "BASE", "http://127.0.0.1:9/api/v10")
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("IMAGINE_MODEL", "tiny")
    monkeypatch.setenv("IMAGINE_DEVICE", "cpu")
    monkeypatch.setenv("IMAGINE_METRICS_PORT", "0")
    assert main(["bot"]) == 2
    sentence = one_sentence(capsys)
    assert "Cannot reach Discord" in sentence and "network" in sentence


def test_a_reader_that_leaves_early_gets_no_traceback(clean_env: Path) -> None:
    env = {"IMAGINE_DATA_DIR": str(clean_env)}
    queued = imagine("generate", "a cat", "--no-wait", env=env, stdout=subprocess.PIPE)
    assert queued.communicate(timeout=120)[0].strip() == "1"
    reader, writer = os.pipe()
    os.close(reader)  # as `imagine show 1 | head -0` does, before a byte is written
    try:
        shown = imagine("show", "1", env=env, stdout=writer, stderr=subprocess.PIPE)
    finally:
        os.close(writer)
    _, err = shown.communicate(timeout=120)
    assert err == ""
    assert shown.returncode == 141


def _status(database: Path, generation_id: int) -> str | None:
    with sqlite3.connect(database) as connection:
        row = connection.execute(
            "SELECT status FROM generations WHERE id = ?", (generation_id,)
        ).fetchone()
    return None if row is None else str(row[0])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_generation_within_a_step_and_cancels_it(
    clean_env: Path, signum: signal.Signals
) -> None:
    env = {"IMAGINE_DATA_DIR": str(clean_env)}
    running = imagine(
        "generate",
        "a cat --steps 150",
        "--model",
        "tiny",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert running.stderr is not None
        seen = []
        for line in running.stderr:
            seen.append(line)
            if line.startswith("loaded "):
                break
        else:
            pytest.fail("".join(seen))
        deadline = time.monotonic() + 60
        while _status(clean_env / "imagine.db", 1) != "running":
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.1)
        running.send_signal(signum)
        sent = time.monotonic()
        while _status(clean_env / "imagine.db", 1) != "cancelled":
            assert time.monotonic() - sent < 5, "the row was not cancelled within 5 s"
            time.sleep(0.1)
        _, err = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 130
    assert "Traceback" not in err
    assert "generation 1 is cancelled" in err
    status = imagine("status", "1", env=env, stdout=subprocess.PIPE)
    assert status.communicate(timeout=120)[0].strip() == "generation 1: cancelled"


def test_doctor_with_postgresql_down_says_how_to_start_it_and_stays_quiet(
    clean_env: Path,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing answers there
    env = {
        "IMAGINE_DATA_DIR": str(clean_env),
        "IMAGINE_MODEL": "tiny",
        "IMAGINE_DEVICE": "cpu",
        "IMAGINE_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/imagine",
    }
    doctor = imagine("doctor", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = doctor.communicate(timeout=300)
    assert doctor.returncode == 1
    assert "torchvision" not in err and "Traceback" not in err
    database = next(line for line in out.splitlines() if "database:" in line)
    assert database.startswith("FAIL") and "unreachable" in database
    assert "start PostgreSQL" in database
    assert "imagine db upgrade" not in out
