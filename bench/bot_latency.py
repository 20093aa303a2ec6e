"""Time to acknowledge /imagine under load, and the bot's memory, through the fake Discord.

Runs two bot processes against the same local fake Discord (tests/fake_discord.py),
one after the other, and sends each 100 concurrent slash commands:

  baseline  a bare discord.py bot whose command only defers
  imagine   Imagine's bot (parse, defer, policy, submit, "queued #N" edit),
            without the embedded worker (no model, as in the scaled mode)

It prints p50/p99 from INTERACTION_CREATE sent to the defer received, both
resident set sizes, and the ratios imagine/baseline. Targets: p99 < 250 ms and
resident memory < 150 MB for the Imagine bot.

    python bench/bot_latency.py [--count 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _patch(api: str, gateway: str) -> None:
    import discord.gateway
    import discord.http
    import yarl

    discord.http.Route.BASE = api
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)


async def _serve_baseline() -> None:
    import discord
    from discord import app_commands

    client = discord.Client(intents=discord.Intents.none())
    tree = app_commands.CommandTree(client)

    @tree.command(name="imagine", description="defer only")
    async def imagine(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.defer(thinking=True)

    @client.event
    async def setup_hook() -> None:
        await tree.sync()

    await client.start("fake-token")


async def _serve_imagine(folder: Path) -> None:
    from bot.app import ImagineBot
    from bot.deployment import open_deployment
    from bot.services import Services
    from generation.styles import StyleRegistry
    from storage.families import configured_family
    from storage.settings import Settings

    settings = Settings(data_dir=folder, model="tiny", styles_dir=folder / "styles")
    async with open_deployment(settings) as deployment:
        family = configured_family("tiny", "auto")
        services = Services.for_deployment(deployment, StyleRegistry(), family)
        await ImagineBot(services).start("fake-token")


def serve(mode: str, api: str, gateway: str, folder: str) -> None:
    _patch(api, gateway)
    if mode == "baseline":
        asyncio.run(_serve_baseline())
    else:
        asyncio.run(_serve_imagine(Path(folder)))


def _rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def until_ready(fake: Any, process: asyncio.subprocess.Process, what: str) -> None:
    """Until the bot in ``process`` has connected, synced its commands and had its guild."""
    await fake.wait_for(
        lambda: process.returncode is not None or (fake._sockets and fake.commands),
        within=120,
        what=f"the {what} bot",
    )
    if process.returncode is not None:
        raise SystemExit(f"the {what} bot exited with {process.returncode}")
    await asyncio.sleep(2.5)  # past discord.py's guild_ready_timeout


async def measure(mode: str, count: int, folder: Path) -> dict[str, Any]:
    from tests.fake_discord import FakeDiscord, user

    fake = FakeDiscord()
    await fake.start()
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        mode,
        f"{fake.base}/api/v10",
        f"ws://127.0.0.1:{fake.port}/gateway",
        str(folder),
        cwd=ROOT,
    )
    try:
        await until_ready(fake, process, mode)
        ready = time.perf_counter() - started
        users = [user(800_000_000_000_000_000 + n, f"user{n}") for n in range(count)]
        interactions = await asyncio.gather(
            *(
                fake.slash("imagine", by=users[n], options={"prompt": f"a lighthouse number {n}"})
                for n in range(count)
            )
        )
        await fake.wait_for(
            lambda: all(i.responded_at for i in interactions), within=60, what="every defer"
        )
        await asyncio.sleep(1.0)  # let the follow-up edits finish before reading memory
        rss, peak = _rss_mb(process.pid)
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
        await fake.stop()
    latencies = sorted(1000 * (i.responded_at - i.sent_at) for i in interactions if i.responded_at)
    return {
        "p50": statistics.median(latencies),
        "p99": latencies[max(0, round(0.99 * len(latencies)) - 1)],
        "rss": rss,
        "peak": peak,
        "ready": ready,
        "deferred": sum(1 for i in interactions if i.response_type == 5),
    }


async def main_async(count: int) -> int:
    results = {}
    for mode in ("baseline", "imagine"):
        with tempfile.TemporaryDirectory(prefix="imagine-bench-bot-") as folder:
            results[mode] = await measure(mode, count, Path(folder))
        r = results[mode]
        print(
            f"{mode:8}: {r['deferred']}/{count} deferred; defer latency p50 {r['p50']:.1f} ms, "
            f"p99 {r['p99']:.1f} ms; resident {r['rss']:.1f} MB (peak {r['peak']:.1f} MB); "
            f"connected and synced in {r['ready']:.2f}s",
            flush=True,
        )
    base, ours = results["baseline"], results["imagine"]
    print(
        f"imagine/baseline: p99 {ours['p99'] / base['p99']:.2f}x, "
        f"resident {ours['rss'] / base['rss']:.2f}x"
    )
    ok = ours["p99"] < 250 and ours["rss"] < 150 and ours["deferred"] == count
    print(
        f"targets: p99 {ours['p99']:.1f} ms < 250 ms, resident {ours['rss']:.1f} MB < 150 MB: "
        + ("met" if ok else "NOT met")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        os.environ.setdefault("IMAGINE_DATA_DIR", sys.argv[5])
        serve(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    sys.exit(asyncio.run(main_async(parser.parse_args().count)))
