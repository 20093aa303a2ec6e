"""The local commands: from a prompt to a grid PNG on disk, without Discord."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy.engine import URL

IMAGINE = Path(sys.executable).parent / "imagine"
PROMPT = "a red bicycle on a beach --ar 3:2 --seed 42"


def run_imagine(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env |= {"IMAGINE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(IMAGINE), *args], env=env, capture_output=True, text=True, timeout=300
    )
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imagine-data")


@pytest.fixture(scope="module")
def first_grid(data_dir: Path) -> Path:
    result = run_imagine("generate", PROMPT, "--model", "tiny", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path


def test_generate_writes_a_grid_whose_metadata_holds_the_recipe(first_grid: Path) -> None:
    from generation.metadata import read_recipe

    recipe = read_recipe(first_grid.read_bytes())
    assert recipe.prompt == "a red bicycle on a beach"
    assert recipe.seed == 42
    assert recipe.aspect_ratio == "3:2"
    assert recipe.width > recipe.height
    assert recipe.model_hash
    with Image.open(first_grid) as grid:
        assert "parameters" in grid.info
        assert "Seed: 42" in grid.info["parameters"]
        assert grid.size == (recipe.width * 2, recipe.height * 2)


def test_the_written_grid_is_the_one_the_worker_stored(first_grid: Path, data_dir: Path) -> None:
    import sqlite3

    data = first_grid.read_bytes()
    with sqlite3.connect(data_dir / "imagine.db") as connection:
        [(key,)] = connection.execute(
            "SELECT grid_blob_key FROM generations ORDER BY id LIMIT 1"
        ).fetchall()
    assert (data_dir / "blobs" / key[:2] / key[2:4] / key).read_bytes() == data


def test_generating_twice_gives_identical_pixels(first_grid: Path, data_dir: Path) -> None:
    second = run_imagine(
        "generate",
        PROMPT,
        "--model",
        "tiny",
        "--out",
        str(data_dir / "again.png"),
        data_dir=data_dir,
    )
    assert second.returncode == 0, second.stderr
    with Image.open(first_grid) as a, Image.open(data_dir / "again.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _ids(stdout: str) -> tuple[int, list[int]]:
    line = next(line for line in stdout.splitlines() if line.startswith("generation "))
    generation_id = int(line.split()[1].rstrip(":"))
    image_ids = [int(part) for part in line.split("image ids ")[1].split(", ")]
    return generation_id, image_ids


def test_upscale_vary_reroll_and_show(first_grid: Path, data_dir: Path) -> None:
    made = run_imagine("generate", "a lighthouse --seed 3", "--model", "tiny", data_dir=data_dir)
    assert made.returncode == 0, made.stderr
    generation_id, image_ids = _ids(made.stdout)
    assert len(image_ids) == 4

    upscaled = run_imagine("upscale", str(image_ids[1]), "--model", "tiny", data_dir=data_dir)
    assert upscaled.returncode == 0, upscaled.stderr
    with Image.open(upscaled.stdout.strip().splitlines()[-1]) as big:
        assert big.size == (192, 192)  # the tiny family is 96x96

    for flag in ("--subtle", "--strong"):
        varied = run_imagine("vary", str(image_ids[2]), flag, "--model", "tiny", data_dir=data_dir)
        assert varied.returncode == 0, varied.stderr
        assert len(_ids(varied.stdout)[1]) == 4

    rerolled = run_imagine("reroll", str(generation_id), "--model", "tiny", data_dir=data_dir)
    assert rerolled.returncode == 0, rerolled.stderr
    reroll_id = _ids(rerolled.stdout)[0]

    shown = run_imagine("show", str(reroll_id), data_dir=data_dir)
    assert shown.returncode == 0, shown.stderr
    assert "reroll, succeeded" in shown.stdout
    assert "a lighthouse" in shown.stdout
    assert not re.search(r"--seed 3\b", shown.stdout)  # a reroll has a new seed


def test_bad_flag_is_one_sentence(data_dir: Path) -> None:
    result = run_imagine("generate", "a cat --ar 0:1", "--model", "tiny", data_dir=data_dir)
    assert result.returncode == 2
    assert "--ar" in result.stderr and "Traceback" not in result.stderr


def test_show_unknown_generation_says_so(data_dir: Path) -> None:
    result = run_imagine("show", "999999", data_dir=data_dir)
    assert result.returncode == 2
    assert "no generation 999999" in result.stderr


def test_styles_lists_an_empty_folder_helpfully(data_dir: Path) -> None:
    result = run_imagine("styles", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "no styles in" in result.stdout


def test_no_wait_status_cancel_and_a_worker_process(data_dir: Path) -> None:
    queued = run_imagine(
        "generate", "a fox {red, blue}", "--no-wait", "--model", "tiny", data_dir=data_dir
    )
    assert queued.returncode == 0, queued.stderr
    first, second = (int(line) for line in queued.stdout.split())
    status = run_imagine("status", str(second), data_dir=data_dir)
    assert "queued, #2 in line" in status.stdout
    cancelled = run_imagine("cancel", str(second), data_dir=data_dir)
    assert f"generation {second}: cancelled" in cancelled.stdout

    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env |= {
        "IMAGINE_DATA_DIR": str(data_dir),
        "HF_HUB_OFFLINE": "1",
        "IMAGINE_METRICS_PORT": str(port),
    }
    worker = subprocess.Popen(
        [str(IMAGINE), "worker", "--model", "tiny", "--name", "test-worker"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if "succeeded" in run_imagine("status", str(first), data_dir=data_dir).stdout:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the worker did not run the queued generation")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            metrics = page.read().decode()
        assert 'imagine_jobs_total{status="succeeded"} 1.0' in metrics
        assert "imagine_job_seconds_count 1.0" in metrics
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 0, stderr
    assert f"generation {first} succeeded in" in stderr and "on test-worker" in stderr
    assert run_imagine("status", str(second), data_dir=data_dir).stdout.endswith("cancelled\n")


def test_generate_against_the_configured_database_url(database_url: URL, tmp_path: Path) -> None:
    """On PostgreSQL the images go to the database blob store, readable by any worker."""
    env = {
        "IMAGINE_DATABASE_URL": database_url.render_as_string(hide_password=False),
        "IMAGINE_DATA_DIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}

    def imagine(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(IMAGINE), *args], env=base | env, capture_output=True, text=True, timeout=300
        )

    assert imagine("db", "upgrade").returncode == 0
    made = imagine("generate", "a lantern --seed 9", "--model", "tiny")
    assert made.returncode == 0, made.stderr
    generation_id, _ = _ids(made.stdout)
    shown = imagine("show", str(generation_id))
    assert "seed 9" in shown.stdout
    stored_in_database = database_url.get_backend_name() == "postgresql"
    assert (tmp_path / "blobs").exists() is not stored_in_database


def test_generate_beside_a_running_bot_is_neither_taken_over_nor_run_twice(
    tmp_path: Path,
) -> None:
    """`imagine generate` on the data folder of a running bot: the bot's sweep (which
    takes over the jobs of workers that stopped beating) and its worker leave it alone."""
    import asyncio

    from sqlalchemy import select

    from storage.database import Database
    from storage.models import Generation, GenerationStatus, Worker
    from storage.scheduling import Limits, claim_next, requeue_orphans
    from storage.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env |= {"IMAGINE_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    command = [str(IMAGINE), "generate", "a slow lighthouse --steps 40", "--model", "tiny"]
    generating = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)

    async def the_bot_meanwhile() -> list[int]:
        database = Database.from_settings(Settings(data_dir=tmp_path))
        moved: list[int] = []
        try:
            while generating.poll() is None:
                await asyncio.sleep(0.3)
                try:
                    async with database.session() as session:
                        moved += await requeue_orphans(session, 3, own_name="the-bot")
                        taken = await claim_next(session, "the-bot", Limits(1, 20))
                        moved += [] if taken is None else [-taken.id]
                except Exception as exc:  # the file or its tables not made yet
                    if "no such table" not in str(exc):
                        raise
            async with database.session() as session:
                row = await session.scalar(select(Generation))
                assert row is not None and row.status is GenerationStatus.SUCCEEDED
                assert row.attempts == 1 and row.worker_name.startswith("cli-")
                assert await session.scalar(select(Worker)) is None  # its beat is forgotten
        finally:
            await database.dispose()
        return moved

    assert asyncio.run(the_bot_meanwhile()) == []
    assert generating.wait(60) == 0
