"""``imagine doctor``: is this machine ready to run Imagine? One line per check.

Each check prints ``ok``, ``warn`` (works, but read this) or ``FAIL`` with what
to do. The exit code is 1 when any check fails. ``--quick`` runs only the
checks a container health check needs (database and blob store).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.cli.discord_commands import client_id_from_token
from storage.errors import ImagineError
from storage.families import configured_family
from storage.settings import Settings, load_settings

OK, WARN, FAIL = "ok", "warn", "FAIL"
LOW_DISK_BYTES = 2**30
LOW_DISK_FRACTION = 0.05
TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{17,40}\.[A-Za-z0-9_-]{4,10}\.[A-Za-z0-9_-]{20,}$")


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:>4}  {self.name}: {self.detail}"


def register(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor", help="check token, database, storage, GPU, model, styles"
    )
    doctor.add_argument(
        "--quick", action="store_true", help="only the database and blob store (health checks)"
    )
    doctor.set_defaults(handler=_doctor)
    reference = commands.add_parser("settings", help="print every setting as a Markdown table")
    reference.set_defaults(handler=_settings_reference)


def _settings_reference(args: argparse.Namespace) -> int:
    from storage.settings import reference_table

    print(reference_table(), end="")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ImagineError as exc:
        print(Check("settings", FAIL, str(exc)).line())
        return 1
    checks = asyncio.run(run_checks(settings, quick=args.quick))
    for check in checks:
        print(check.line(), flush=True)
    return 1 if any(check.status == FAIL for check in checks) else 0


async def run_checks(settings: Settings, *, quick: bool = False) -> list[Check]:
    checks = [await check_database(settings), await check_blobs(settings)]
    if quick:
        return checks
    checks.insert(0, check_token(settings))
    checks.append(await asyncio.to_thread(check_disk, settings))
    slow: list[Callable[[Settings], Check]] = [
        check_device,
        check_compile,
        check_model,
        check_memory,
    ]
    for step in slow:  # torch import, model files: off the event loop
        checks.append(await asyncio.to_thread(step, settings))
    checks.append(check_styles(settings))
    return checks


def check_token(settings: Settings) -> Check:
    token = settings.discord_token
    if not token:
        return Check(
            "discord token",
            FAIL,
            "DISCORD_TOKEN is not set; create a bot at https://discord.com/developers/applications "
            "(Bot → Reset Token), export DISCORD_TOKEN=<token>, then run `imagine invite`.",
        )
    if not TOKEN_SHAPE.match(token) or client_id_from_token(token) is None:
        return Check(
            "discord token",
            FAIL,
            "DISCORD_TOKEN does not have a bot token's shape (three dot-separated parts, the "
            "first the bot's id in base64); copy it again from the Bot page.",
        )
    return Check("discord token", OK, f"well formed, for application {client_id_from_token(token)}")


async def check_database(settings: Settings) -> Check:
    from migrations import runner
    from storage.database import Database, describe_url

    try:
        database = Database.from_settings(settings)
    except ImagineError as exc:
        return Check("database", FAIL, str(exc))
    where = describe_url(database.url)
    try:
        file = database.url.database
        if settings.uses_sqlite and file and not await asyncio.to_thread(Path(file).exists):
            return Check(
                "database",
                OK,
                f"{where}: not created yet; `imagine bot` creates and migrates it at start",
            )
        state = await runner.state(database)
    except ImagineError as exc:
        host, port = database.url.host, database.url.port or 5432
        if host and not await asyncio.to_thread(_answers, host, port):
            return Check(
                "database",
                FAIL,
                f"{where} is unreachable: nothing answers at {host}:{port}; start PostgreSQL "
                "(`docker compose up -d db` with this repository's compose.yaml, or "
                "`sudo systemctl start postgresql` where it is installed) or fix "
                "IMAGINE_DATABASE_URL",
            )
        return Check("database", FAIL, str(exc))
    finally:
        await database.dispose()
    if state.is_current:
        return Check("database", OK, f"{where}, schema {state.describe()}")
    if settings.uses_sqlite:
        return Check("database", WARN, f"{where}, schema {state.describe()} (done at start)")
    return Check("database", FAIL, f"{where}, schema {state.describe()}")


def _answers(host: str, port: int) -> bool:
    """Whether something accepts connections there (a name that does not resolve: yes,
    so that the database check's own sentence about the name stands)."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except socket.gaierror:
        return True
    except OSError:
        return False


async def check_blobs(settings: Settings) -> Check:
    from bot.deployment import make_blob_store
    from storage.blobs import LocalBlobStore
    from storage.database import Database

    database = Database.from_settings(settings)
    try:
        store = make_blob_store(settings, database)
        if isinstance(store, LocalBlobStore):
            return Check("blob store", OK, f"folder {store.root} is writable")
        await database.check()  # unreachable is said so, not taken for a missing table
        key = await store.put(b"imagine doctor")
        if await store.get(key) != b"imagine doctor":
            return Check("blob store", FAIL, "the database blob store returned other bytes")
        return Check("blob store", OK, "the database blob store takes and gives back bytes")
    except ImagineError as exc:
        return Check("blob store", FAIL, str(exc))
    except Exception as exc:  # the blobs table missing, the server gone, ...
        return Check(
            "blob store", FAIL, f"{type(exc).__name__}: {exc}; run `imagine db upgrade` first"
        )
    finally:
        await database.dispose()


def check_disk(settings: Settings) -> Check:
    """Room left where the database file and the image folder live (the data folder)."""
    folders = [settings.data_dir]
    if settings.blob_store != "database":
        folders.append(settings.resolved_blob_dir)
    seen: dict[int, str] = {}
    for folder in folders:
        existing = _nearest_existing(folder)
        device = existing.stat().st_dev
        if device in seen:
            continue
        usage = shutil.disk_usage(existing)
        free = f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB"
        if usage.free < LOW_DISK_BYTES or usage.free < LOW_DISK_FRACTION * usage.total:
            return Check(
                "disk",
                WARN,
                f"{folder} is low on space ({free}); when the disk is full, jobs fail: delete old "
                "files there or move IMAGINE_DATA_DIR to a larger disk",
            )
        seen[device] = f"{folder}: {free}"
    return Check("disk", OK, "; ".join(seen.values()))


def _nearest_existing(folder: Path) -> Path:
    folder = folder.expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_device(settings: Settings) -> Check:
    try:
        import torch

        from generation.loading import pick_device, pick_dtype
    except ImportError as exc:
        return Check("gpu", FAIL, f"torch is not installed ({exc}); install Imagine with pip.")
    try:
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
    except ImagineError as exc:
        return Check("gpu", FAIL, str(exc))
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        index = device.index or 0
        properties = torch.cuda.get_device_properties(index)
        memory = properties.total_memory / 2**30
        return Check("gpu", OK, f"{properties.name} ({memory:.0f} GiB) on {device}, {name}")
    if device.type == "cpu":
        return Check(
            "gpu",
            WARN,
            f"no GPU: running on the CPU in {name}; fine for `tiny`, minutes per image for "
            "real models (install a CUDA build of torch and the NVIDIA driver)",
        )
    return Check("gpu", OK, f"{device}, {name}")


def check_compile(settings: Settings) -> Check:
    """Whether the worker will torch.compile its model (IMAGINE_COMPILE), and why."""
    try:
        from generation.compiled import plan_compile
        from generation.loading import pick_device

        plan = plan_compile(settings.compile, pick_device(settings.device), settings.offload)
    except ImportError as exc:
        return Check("compile", FAIL, f"torch is not installed ({exc}); install Imagine with pip.")
    except ImagineError as exc:
        return Check("compile", FAIL, str(exc))
    return Check("compile", OK, plan.reason)


def check_model(settings: Settings) -> Check:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from generation.loading import TINY_MODELS, ModelNotFound, quiet_libraries, resolve_source

    quiet_libraries()

    model = settings.model
    offline = settings.model_copy(update={"allow_downloads": False})
    try:
        source = resolve_source(model, offline)
    except ModelNotFound as exc:
        if not settings.allow_downloads:
            return Check("model", FAIL, str(exc))
        return _hub_reachable(model)
    except ImagineError as exc:
        return Check("model", FAIL, str(exc))
    kind = "built in code" if model in TINY_MODELS else source.kind.replace("_", " ")
    if source.kind == "single_file":
        from generation.single_file import describe_single_file

        try:
            kind = describe_single_file(source.path, settings)
        except ImagineError as exc:
            return Check("model", FAIL, str(exc))
    return Check("model", OK, f"{model}: {kind}, at {source.path}")


def check_memory(settings: Settings) -> Check:
    """Whether the model's weights fit the GPU with IMAGINE_OFFLOAD and IMAGINE_QUANTIZE, and
    the fastest option that does."""
    try:
        import torch

        from generation.loading import ModelNotFound, pick_device, pick_dtype, resolve_source
        from generation.memory import GIB, advise, check_offload, fit, parameter_counts
    except ImportError as exc:
        return Check("memory", FAIL, f"torch is not installed ({exc}); install Imagine with pip.")
    try:
        device = pick_device(settings.device)
        check_offload(settings.offload, device)
        source = resolve_source(
            settings.model, settings.model_copy(update={"allow_downloads": False})
        )
        parts = parameter_counts(source.path)  # a file cut short says which
    except ModelNotFound:
        return Check("memory", WARN, "the model is not on this machine yet: sizes unknown")
    except ImagineError as exc:
        return Check("memory", FAIL, str(exc))
    dtype_bytes = pick_dtype(settings.dtype, device).itemsize
    weights = sum(parts.values()) * dtype_bytes / GIB
    if device.type != "cuda":
        return Check("memory", OK, f"{weights:.1f} GiB of weights in {device.type} memory")
    gpu_bytes = torch.cuda.get_device_properties(device.index or 0).total_memory
    best, advice = advise(parts, dtype_bytes, gpu_bytes)
    chosen = fit(parts, dtype_bytes, gpu_bytes, settings.offload, settings.quantize)
    if not chosen.fits:
        return Check(
            "memory", FAIL if best is None else WARN, f"{chosen.settings} will not fit: {advice}"
        )
    return Check(
        "memory", OK, f"{chosen.settings} needs about {chosen.gpu_bytes / GIB:.1f} GiB; {advice}"
    )


def _hub_reachable(model: str) -> Check:
    try:
        from huggingface_hub import model_info

        info = model_info(model, timeout=10)
    except Exception as exc:
        return Check(
            "model",
            FAIL,
            f"{model} is not in the local cache and the hub did not answer "
            f"({type(exc).__name__}); check the name and the network, or set IMAGINE_MODEL "
            "to a local folder or .safetensors file.",
        )
    return Check(
        "model",
        WARN,
        f"{model} is not cached yet; found on the hub ({info.id}), downloaded at start",
    )


def check_styles(settings: Settings) -> Check:
    from generation.styles import StyleRegistry

    folder = settings.resolved_styles_dir
    registry = StyleRegistry.from_folder(folder)
    family = configured_family(settings.model, settings.model_family)
    problems = list(registry.problems)
    for name in registry.names():
        style = registry.get(name)
        if style.family != family.name:
            problems.append(
                f"{style.source.name}: made for {style.family}, but the model is {family.name}"
            )
    if problems:
        return Check("styles", FAIL, "; ".join(problems))
    if not registry.names():
        return Check("styles", OK, f"none in {folder} (add TOML files there; see README)")
    return Check("styles", OK, f"{len(registry.names())} valid in {folder}")
