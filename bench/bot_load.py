"""1,000 members at once through the fake Discord, in the scaled mode: time to defer and memory.

Starts a throwaway PostgreSQL database, the local fake Discord (tests/fake_discord.py),
Imagine's bot in its own process (scaled mode: no model, jobs through procrastinate)
and one ``imagine worker``-style process whose engine answers at once with 8x8
images, so that the bot is what is measured. Then:

  warm-up   every member sends /imagine at once (1,000 interactions); the worker
            runs them and the bot posts the grids with their buttons
  load      bursts of /imagine and button clicks on posted results (U, V, reroll,
            vary, upscale), until 10,000 interactions in all

It prints p50/p99/max from INTERACTION_CREATE sent to the interaction's first
response received, how many took over Discord's 3 s (target: none), the answers
by kind (deferred, refused with a sentence), and the bot's resident memory
(psutil) after the warm-up, along the way and after the 10,000, with the bound it
must stay within.

    python bench/bot_load.py [--members 1000] [--interactions 10000] [--burst 500]
        [--url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.rate_limit import BUSY  # noqa: E402

# Growth of the bot's resident memory from the end of the warm-up to the end of the run
# that counts as flat: what the bounded caches (discord.py's 1,000 messages, the rate
# limiter's members of the last window, the database pools) may still fill after the
# warm-up, with room for the allocator's fragmentation. A leak of even 2 KiB per
# interaction (18 MiB over the 9,000 after the warm-up) does not fit under it.
RSS_GROWTH_BOUND_MIB = 16.0
DEADLINE = 3.0  # Discord's, for an interaction's first response
MODEL = "tiny"
GRID_ACTIONS = ("U1", "U2", "U3", "U4", "V1", "V2", "V3", "V4", "🔄")


def _settings(url: str, folder: Path) -> Any:
    from storage.settings import Settings

    (folder / "styles").mkdir(parents=True, exist_ok=True)
    return Settings(data_dir=folder, database_url=url, model=MODEL, styles_dir=folder / "styles")


def _trace_memory(folder: Path) -> None:
    """With --trace-memory: each SIGUSR1 writes where memory grew since the previous one."""
    import signal
    import tracemalloc

    tracemalloc.start(8)
    snapshots = [tracemalloc.take_snapshot()]

    def dump(*_: Any) -> None:
        snapshots.append(tracemalloc.take_snapshot())
        stats = snapshots[-1].compare_to(snapshots[-2], "traceback")[:8]
        lines = [f"-- since the previous snapshot: {len(snapshots) - 1}"]
        for stat in stats:
            lines.append(f"{stat.size_diff / 2**20:+.2f} MiB in {stat.count_diff:+d} blocks")
            lines += [f"    {frame}" for frame in stat.traceback.format()[-8:]]
        with (folder / "memory.txt").open("a") as out:
            out.write("\n".join(lines) + "\n")

    signal.signal(signal.SIGUSR1, dump)


ROUND_TRIPS = "round-trips"  # the bot's count so far, in the data folder


def _count_round_trips(deployment: Any, folder: Path) -> asyncio.Task[None]:
    """Count the bot's database round trips (each statement, BEGIN, COMMIT and ROLLBACK
    through SQLAlchemy, and each query of procrastinate's own connector) and write the
    count to ``folder / ROUND_TRIPS`` every 50 ms."""
    from sqlalchemy import event

    count = [0]

    def statement(*_: Any, **__: Any) -> None:
        count[0] += 1

    def transaction(connection: Any, *_: Any) -> None:
        # Outside a transaction (autocommit) the driver sends no BEGIN, COMMIT or ROLLBACK.
        if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            count[0] += 1

    engine = deployment.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", statement)
    for name in ("begin", "commit", "rollback"):
        event.listen(engine, name, transaction)
    connector = getattr(getattr(deployment.queue, "app", None), "connector", None)
    for name in ("execute_query_async", "execute_query_one_async", "execute_query_all_async"):
        method = getattr(connector, name, None)
        if method is not None:

            async def counted(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
                count[0] += 1
                return await _method(*args, **kwargs)

            setattr(connector, name, counted)

    async def write() -> None:
        while True:
            (folder / ROUND_TRIPS).write_text(str(count[0]))
            await asyncio.sleep(0.05)

    return asyncio.create_task(write())


async def _serve_bot(url: str, folder: Path) -> None:
    from bot.app import ImagineBot
    from bot.deployment import open_deployment
    from bot.services import Services
    from generation.styles import StyleRegistry
    from storage.families import configured_family

    async with open_deployment(_settings(url, folder)) as deployment:
        family = configured_family(MODEL, "auto")
        services = Services.for_deployment(deployment, StyleRegistry(), family)
        bot = ImagineBot(services)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _print_state, bot)
        counting = _count_round_trips(deployment, folder)
        try:
            await bot.start("fake-token")
        finally:
            counting.cancel()


_TYPE_COUNTS: Counter[str] = Counter()
MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


def _waits_at(task: asyncio.Task[Any]) -> str:
    """Where a task waits: the innermost of our frames in its chain of awaits."""
    where = "?"
    coroutine: Any = task.get_coro()
    while coroutine is not None:
        frame = getattr(coroutine, "cr_frame", None) or getattr(coroutine, "ag_frame", None)
        if frame is not None and "/site-packages/" not in frame.f_code.co_filename:
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        coroutine = getattr(coroutine, "cr_await", None) or getattr(coroutine, "ag_await", None)
    return where


def _heap_state() -> str:
    """With --trace-memory: the bot's tasks by coroutine and by where they wait, the
    objects by type that grew since the previous call, and C malloc's held and in-use
    bytes. Python objects that pile up show in the first two, fragmentation in the last."""
    import ctypes
    import gc

    collected = gc.collect()
    objects = gc.get_objects()
    counts = Counter(type(o).__name__ for o in objects)
    tasks = asyncio.all_tasks()
    by_coroutine = Counter(getattr(t.get_coro(), "__qualname__", "?") for t in tasks)
    grown = (counts - _TYPE_COUNTS).most_common(8)
    _TYPE_COUNTS.clear()
    _TYPE_COUNTS.update(counts)
    lines = [
        f"gc collected {collected}; {len(objects)} objects; {len(tasks)} tasks: "
        f"{by_coroutine.most_common(4)}",
        f"tasks wait at {Counter(_waits_at(t) for t in tasks).most_common(5)}",
        "objects grown: " + ", ".join(f"{name} +{n}" for name, n in grown),
    ]
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return "\n".join(lines)

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS]

    mallinfo2.restype = Mallinfo2
    info = mallinfo2()
    lines.append(
        f"malloc arenas {info.arena / 2**20:.1f} MiB ({info.uordblks / 2**20:.1f} in use), "
        f"mmapped {info.hblkhd / 2**20:.1f} MiB"
    )
    return "\n".join(lines)


def _print_state(bot: Any) -> None:
    """What the bot keeps per member, generation or request (SIGUSR2, at warm-up and end)."""
    if os.environ.get("IMAGINE_BENCH_TRACE_MEMORY"):
        print(_heap_state(), flush=True)
    delivery = bot.delivery
    print(
        f"bot state: {len(bot.rate_limiter or ())} members in the rate limiter; delivery "
        f"{len(delivery._locks)} locks, {len(delivery._last_edit)} edit times, "
        f"{len(delivery.upload_limits)} upload limits, {len(delivery._tasks)} tasks; "
        f"discord.py {len(bot.http._buckets)} rate-limit buckets, "
        f"{len(bot._connection._messages or ())} cached messages; "
        f"{bot.submitting.waiting} commands waiting their turn",
        flush=True,
    )


async def _serve_worker(url: str, folder: Path) -> None:
    from bench.queue_throughput import NoopEngine
    from bot.deployment import open_deployment
    from generation.worker import Worker

    async with open_deployment(_settings(url, folder)) as deployment:
        engine = NoopEngine(MODEL, grids=True)
        worker = Worker.for_deployment(deployment, cast(Any, engine), name="load-worker")
        await worker.run(asyncio.Event())


def serve(role: str, api: str, gateway: str, url: str, folder: str) -> None:
    from bench.bot_latency import _patch

    if role == "bot":
        _patch(api, gateway)
        if os.environ.get("IMAGINE_BENCH_TRACE_MEMORY"):
            _trace_memory(Path(folder))
        asyncio.run(_serve_bot(url, Path(folder)))
    else:
        asyncio.run(_serve_worker(url, Path(folder)))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Load:
    def __init__(self, fake: Any, members: int) -> None:
        from tests.fake_discord import user

        self.fake = fake
        self.members = [user(700_000_000_000_000_000 + n, f"member{n}") for n in range(members)]
        self.sent: list[Any] = []
        self.results: list[int] = []  # ids of posted messages that carry buttons
        self._known: set[int] = set()
        self.rng = random.Random(7)

    async def burst(self, count: int, *, imagine_only: bool = False) -> None:
        start = len(self.sent)
        self._collect_results()
        tasks = [
            self._one(self.members[(start + n) % len(self.members)], imagine_only)
            for n in range(count)
        ]
        batch = await asyncio.gather(*tasks)
        self.sent += batch
        deadline = time.monotonic() + 120
        while any(i.responded_at is None for i in batch) and time.monotonic() < deadline:  # noqa: ASYNC110 - polled by design
            await asyncio.sleep(0.1)

    async def _one(self, member: dict[str, Any], imagine_only: bool) -> Any:
        if imagine_only or not self.results or self.rng.random() < 0.4:
            number = len(self.sent)
            prompt = f"a lighthouse at dusk, number {number} --seed {number}"
            return await self.fake.slash("imagine", by=member, options={"prompt": prompt})
        message_id = self.rng.choice(self.results)
        buttons = {
            b.get("label") or b.get("emoji", {}).get("name"): b["custom_id"]
            for b in self.fake.buttons(message_id)
        }
        wanted = [a for a in (*GRID_ACTIONS, "Vary (Subtle)", "Upscale 2×") if a in buttons]
        return await self.fake.click(message_id, buttons[self.rng.choice(wanted)], by=member)

    def _collect_results(self) -> None:
        for message_id, message in list(self.fake.messages.items()):
            if message_id in self._known or message_id in self.fake.deleted:
                continue
            if message.get("components") and not message.get("flags", 0) & (1 << 6):
                self._known.add(message_id)
                self.results.append(message_id)

    async def until_results(self, wanted: int, within: float) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self._collect_results()
            if len(self.results) >= wanted:
                return
            await asyncio.sleep(0.5)


async def settled_round_trips(folder: Path, quiet: float = 0.5) -> int:
    """The bot's round trips so far, once the count has not moved for ``quiet`` seconds."""
    last, still = -1, 0
    while still < quiet / 0.05:
        await asyncio.sleep(0.05)
        now = int((folder / ROUND_TRIPS).read_text() or 0)
        still = still + 1 if now == last else 0
        last = now
    return last


async def round_trips_per_kind(fake: Any, load: Load, folder: Path) -> list[tuple[str, int]]:
    """With the worker stopped, so that only the bot works: the round trips of one /imagine
    (a new member's, then the same member's second), and of one click of each kind of
    button (U1, V1, reroll on a grid; Vary (Subtle) under an image), each until the member's
    message shows it queued (or the image)."""
    from tests.fake_discord import user

    member = user(800_000_000_000_000_001, "probe")
    load._collect_results()
    grids = [m for m in load.results if any(b.get("label") == "U1" for b in fake.buttons(m))]
    images = [
        m for m in load.results if any(b.get("label") == "Vary (Subtle)" for b in fake.buttons(m))
    ]
    probes: list[tuple[str, Any]] = [
        (
            "/imagine, new member",
            lambda: fake.slash("imagine", by=member, options={"prompt": "a probe --seed 1"}),
        ),
        (
            "/imagine",
            lambda: fake.slash("imagine", by=member, options={"prompt": "a probe --seed 2"}),
        ),
    ]
    if grids:
        for label in ("U1", "V1", "🔄"):
            probes.append(
                (
                    f"click {label}",
                    lambda label=label: fake.click(
                        grids[0], fake.button(grids[0], label), by=member
                    ),
                )
            )
    if images:
        probes.append(
            (
                "click Vary (Subtle)",
                lambda: fake.click(images[0], fake.button(images[0], "Vary (Subtle)"), by=member),
            )
        )
    costs = []
    for what, send in probes:
        before = await settled_round_trips(folder)
        interaction = await send()
        await fake.wait_for(lambda i=interaction: i.responded_at is not None, what=what)
        costs.append((what, await settled_round_trips(folder) - before))
    return costs


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def own_cpu_ms_per(interactions: int) -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return 1000 * float(times.user + times.system) / max(1, interactions)


def rss_mib(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def _spawn(role: str, fake: Any, url: str, folder: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        role,
        f"{fake.base}/api/v10",
        f"ws://127.0.0.1:{fake.port}/gateway",
        url,
        str(folder),
        cwd=ROOT,
    )


async def measure(url: str, folder: Path, members: int, total: int, burst: int, trace: bool) -> int:
    from bench.bot_latency import until_ready
    from tests.fake_discord import FakeDiscord

    fake = FakeDiscord()
    await fake.start()
    bot = await _spawn("bot", fake, url, folder)
    worker: asyncio.subprocess.Process | None = None
    try:
        await until_ready(fake, bot, "Imagine")
        worker = await _spawn("worker", fake, url, folder)
        load = Load(fake, members)
        began = time.perf_counter()
        await load.burst(members, imagine_only=True)
        await load.until_results(members // 2, within=300)
        warm = rss_mib(bot.pid)
        bot.send_signal(signal.SIGUSR2)
        cpu_warm = cpu_seconds(bot.pid)
        trips_warm = int((folder / ROUND_TRIPS).read_text() or 0)
        if trace:
            bot.send_signal(signal.SIGUSR1)
        samples = [(len(load.sent), warm)]
        print(
            f"warm-up: {len(load.sent)} /imagine at once, {len(load.results)} results posted; "
            f"bot resident {warm:.1f} MiB",
            flush=True,
        )
        while len(load.sent) < total:
            await load.burst(min(burst, total - len(load.sent)))
            if len(load.sent) % 1000 < burst:
                samples.append((len(load.sent), rss_mib(bot.pid)))
                bot.send_signal(signal.SIGUSR2)
        seconds = time.perf_counter() - began
        cpu_ms = 1000 * (cpu_seconds(bot.pid) - cpu_warm) / max(1, len(load.sent) - members)
        await asyncio.sleep(3)  # the last follow-ups and edits
        final = rss_mib(bot.pid)
        bot.send_signal(signal.SIGUSR2)
        await asyncio.sleep(1)
        bench_cpu = own_cpu_ms_per(len(load.sent))
        print(f"bench (fake Discord and driver) CPU per interaction: {bench_cpu:.1f} ms")
        worker.terminate()
        await worker.wait()
        # What the bot still has in hand (commands waiting their turn) is part of the run.
        trips = await settled_round_trips(folder, quiet=2.0) - trips_warm
        print(
            f"bot database round trips after the warm-up: {trips / max(1, total - members):.1f} "
            "per interaction (all its work, from the defer to the delivery)"
        )
        costs = await round_trips_per_kind(fake, load, folder)
        print("round trips, worker stopped: " + ", ".join(f"{w}: {n}" for w, n in costs))
        if trace:
            bot.send_signal(signal.SIGUSR1)
            await asyncio.sleep(20)
            print((folder / "memory.txt").read_text())
    finally:
        for process in (worker, bot):
            if process is not None and process.returncode is None:
                process.terminate()
                await process.wait()
        await fake.stop()
    print(
        f"bot CPU per interaction after the warm-up: {cpu_ms:.1f} ms "
        "(all its work, from the defer to the delivery)"
    )
    return report(load.sent, samples, warm, final, seconds)


OUTCOMES = (
    "accepted",
    "refused by the rate limit",
    "refused: the line is full",
    "refused otherwise",
)


def outcome(interaction: Any) -> str:
    """What the bot's first response to an interaction was: deferred (the command is
    taken), or a refusal, by its sentence."""
    if interaction.response_type != 4:
        return "deferred"
    content = (interaction.responses[0].get("data") or {}).get("content", "")
    if content.startswith("You're going too fast"):
        return "refused by the rate limit"
    if content == BUSY:
        return "refused: the line is full"
    return "refused otherwise"


def report(
    sent: list[Any], samples: list[tuple[int, float]], warm: float, final: float, seconds: float
) -> int:
    answered = [i for i in sent if i.responded_at is not None]
    latencies = [1000 * (i.responded_at - i.sent_at) for i in answered]
    late = sum(1 for ms in latencies if ms > DEADLINE * 1000)
    kinds = Counter(
        {5: "deferred", 6: "deferred update", 4: "answered", 9: "modal", 7: "updated"}.get(
            i.response_type, str(i.response_type)
        )
        for i in answered
    )
    print(
        f"{len(sent)} interactions from {len({i.user['id'] for i in sent})} members in "
        f"{seconds:.1f} s ({len(sent) / seconds:.0f}/s): {len(answered)} answered "
        f"({', '.join(f'{n} {k}' for k, n in kinds.most_common())})"
    )
    print(
        f"time to first response: p50 {percentile(latencies, 0.5):.0f} ms, "
        f"p99 {percentile(latencies, 0.99):.0f} ms, max {max(latencies):.0f} ms; "
        f"over {DEADLINE:.0f} s: {late} (target 0); unanswered: {len(sent) - len(answered)}"
    )
    for kind, what in ((2, "/imagine"), (3, "button clicks")):
        these = [1000 * (i.responded_at - i.sent_at) for i in answered if i.type == kind]
        if these:
            print(
                f"  {what}: {len(these)}, p50 {percentile(these, 0.5):.0f} ms, "
                f"p99 {percentile(these, 0.99):.0f} ms"
            )
    outcomes = Counter(outcome(i) for i in answered)
    print(
        "outcomes: " + ", ".join(f"{what} {outcomes[what]}" for what in OUTCOMES if outcomes[what])
    )
    refusals = Counter(
        (i.responses[0].get("data") or {}).get("content", "")[:60]
        for i in answered
        if outcome(i) == "refused otherwise"
    )
    for sentence, count in refusals.most_common(3):
        print(f"  refused otherwise {count}x: {sentence}")
    print("bot resident memory: " + ", ".join(f"{n}: {mib:.1f} MiB" for n, mib in samples))
    growth = final - warm
    flat = growth <= RSS_GROWTH_BOUND_MIB
    print(
        f"bot resident memory after warm-up {warm:.1f} MiB, after {len(sent)} interactions "
        f"{final:.1f} MiB: growth {growth:+.1f} MiB (bound {RSS_GROWTH_BOUND_MIB:.0f} MiB): "
        + ("flat" if flat else "GROWING")
    )
    ok = late == 0 and len(answered) == len(sent) and flat
    print("targets: " + ("met" if ok else "NOT met"))
    return 0 if ok else 1


async def main(admin_url: str, members: int, total: int, burst: int, trace: bool) -> int:
    import asyncpg

    from migrations import runner
    from storage.database import Database, parse_database_url

    admin = parse_database_url(admin_url)
    name = f"imagine_load_{uuid.uuid4().hex[:8]}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    await connection.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name)
    try:
        database = Database(url)
        try:
            await runner.upgrade(database)
        finally:
            await database.dispose()
        with tempfile.TemporaryDirectory(prefix="imagine-bench-load-") as folder:
            rc = await measure(
                url.render_as_string(hide_password=False),
                Path(folder),
                members,
                total,
                burst,
                trace,
            )
        made = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(False))
        try:
            queued = await made.fetchval("SELECT count(*) FROM generations")
        finally:
            await made.close()
        print(f"generations queued in all: {queued} (the round-trip probes' few included)")
        return rc
    finally:
        await connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await connection.close()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        os.environ.setdefault("IMAGINE_DATA_DIR", sys.argv[6])
        serve(*sys.argv[2:7])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--interactions", type=int, default=10_000)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="run the bot under tracemalloc and print where its memory grew, and its tasks "
        "and objects at each sample (slower; the snapshots themselves take memory)",
    )
    arguments = parser.parse_args()
    if arguments.trace_memory:
        os.environ["IMAGINE_BENCH_TRACE_MEMORY"] = "1"
    sys.exit(
        asyncio.run(
            main(
                arguments.url,
                arguments.members,
                arguments.interactions,
                arguments.burst,
                arguments.trace_memory,
            )
        )
    )
