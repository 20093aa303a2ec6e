"""``imagine bot`` and ``imagine invite`` as a user runs them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from bot.cli import main
from bot.cli.discord_commands import client_id_from_token, invite_url
from storage.models import Generation
from tests.conftest import migrated_database
from tests.fake_discord import GUILD_ID, FakeDiscord
from tests.test_worker_processes import start_worker

SHIM = """\
import os
if os.environ.get("FAKE_DISCORD_API"):
    import yarl, discord.http, discord.gateway
    discord.http.Route.BASE = os.environ["FAKE_DISCORD_API"]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(os.environ["FAKE_DISCORD_GATEWAY"])
"""


def test_without_a_token_it_says_how_to_get_one(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bot"]) == 2
    err = capsys.readouterr().err
    assert "DISCORD_TOKEN" in err and "imagine invite" in err
    assert "discord.com/developers/applications" in err


def test_invite_reads_the_application_id_from_the_token(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = base64.b64encode(b"123456789012345678").decode().rstrip("=")
    monkeypatch.setenv("DISCORD_TOKEN", f"{first}.GabCde.xyz")
    assert client_id_from_token(f"{first}.GabCde.xyz") == 123456789012345678
    assert main(["invite"]) == 0
    url = capsys.readouterr().out.strip()
    assert url == invite_url(123456789012345678)
    assert "client_id=123456789012345678" in url
    assert "scope=bot+applications.commands" in url
    assert "permissions=117760" in url  # view, send, embed links, attach files, read history


def test_invite_refuses_a_token_that_is_not_one(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "not a token")
    assert main(["invite"]) == 2
    assert "--client-id" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["embedded", "scaled"])
async def test_imagine_bot_starts_syncs_answers_and_stops_on_sigterm(
    clean_env: Path, tmp_path: Path, request: pytest.FixtureRequest, mode: str
) -> None:
    """Embedded: the worker runs inside the bot. Scaled: the bot loads no model and an
    `imagine worker` process elsewhere runs the job."""
    fake = FakeDiscord()
    await fake.start()
    # The web gallery inside the bot, in both modes
    env = bot_env(fake, tmp_path, IMAGINE_MODEL="tiny", IMAGINE_WEB_PORT=str(free_port()))
    async with contextlib.AsyncExitStack() as stack:
        worker: subprocess.Popen[str] | None = None
        if mode == "scaled":
            database = await stack.enter_async_context(
                migrated_database("postgresql", tmp_path, request)
            )
            env["IMAGINE_DATABASE_URL"] = database.url.render_as_string(hide_password=False)
            worker_dir = tmp_path / "worker"
            worker_dir.mkdir()
            worker = start_worker(database.url, "gpu-1", worker_dir)
            stack.callback(stop_process, worker)
        await run_the_bot(fake, env, scaled=mode == "scaled")
        if worker is not None:
            assert worker.poll() is None, "the worker died"
            async with database.session() as session:
                row = await session.scalar(select(Generation))
            assert row is not None and row.worker_name == "gpu-1" and row.delivered_at


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_process(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def bot_env(fake: FakeDiscord, tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of an `imagine bot` that talks to ``fake`` (on the CPU)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(shim), str(Path.cwd())]),
        "FAKE_DISCORD_API": f"{fake.base}/api/v10",
        "FAKE_DISCORD_GATEWAY": f"ws://127.0.0.1:{fake.port}/gateway",
        "DISCORD_TOKEN": "fake-token",
        "IMAGINE_DEVICE": "cpu",
        **settings,
    }


async def start_bot(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "bot",
        env=env,
        cwd=Path(__file__).parent.parent,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_the_bot(fake: FakeDiscord, env: dict[str, str], *, scaled: bool) -> None:
    process = await start_bot(env)
    assert process.stderr is not None
    log: list[str] = []
    try:

        async def read_until(text: str) -> None:
            assert process.stderr is not None
            while True:
                line = (await process.stderr.readline()).decode()
                assert line, f"imagine bot exited before {text!r}: {''.join(log)}"
                log.append(line)
                if text in line:
                    return

        await asyncio.wait_for(read_until("ready as imagine"), 60)
        assert {"imagine", "info", "show", "queue", "cancel"} <= set(fake.command_names())
        interaction = await fake.slash("imagine", options={"prompt": "a boat --steps 2"})
        await fake.wait_for(
            lambda: fake.original(interaction) and fake.buttons(interaction.original_id or 0),
            within=90,
            what="the grid",
        )
        web = f"http://127.0.0.1:{env['IMAGINE_WEB_PORT']}"
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{web}/healthz")).text == "ok"
            assert (await client.get(f"{web}/g/{GUILD_ID}")).status_code == 404  # off by default
        maps = await asyncio.to_thread(Path(f"/proc/{process.pid}/maps").read_text)
        assert ("libtorch" in maps) is not scaled, "the bot loads torch only when embedded"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0, "".join(log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await fake.stop()
    assert any("commands synced" in line for line in log)


async def test_imagine_bot_exits_when_its_worker_cannot_start(
    clean_env: Path, tmp_path: Path
) -> None:
    """A model that does not load leaves no bot online taking jobs that nothing runs: it
    exits with the reason, so that its supervisor (or its owner) sees it."""
    fake = FakeDiscord()
    await fake.start()
    process = await start_bot(bot_env(fake, tmp_path, IMAGINE_MODEL=str(tmp_path / "missing")))
    try:
        _, err = await asyncio.wait_for(process.communicate(), 90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await fake.stop()
    text = err.decode()
    assert process.returncode == 2, text
    reason = text.splitlines()[-1]
    assert "worker" in reason and "missing" in reason, text
    assert "hf download" not in reason  # a path, not a hub id: nothing to download
