"""Configuration: ``IMAGINE_*`` environment variables over an optional TOML file.

Defaults give the embedded mode: a SQLite database and an image folder under
one data directory. Setting ``IMAGINE_DATABASE_URL`` to a PostgreSQL URL
switches to the scaled mode.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from storage.errors import ConfigError
from storage.families import ASPECT_RATIOS

CONFIG_FILE_ENV = "IMAGINE_CONFIG"
DEFAULT_CONFIG_FILE = "imagine.toml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("imagine", appauthor=False))


def config_file_path() -> Path | None:
    """The TOML file to read: ``$IMAGINE_CONFIG``, else ``./imagine.toml`` if it exists."""
    named = os.environ.get(CONFIG_FILE_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{CONFIG_FILE_ENV} names {path}, which is not a file; "
                "create it or unset the variable."
            )
        return path
    local = Path(DEFAULT_CONFIG_FILE)
    return local if local.is_file() else None


class Settings(BaseSettings):
    """Every knob Imagine reads. Environment names are ``IMAGINE_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGINE_",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Folder for the SQLite database and the image store in embedded mode.",
    )
    database_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the database. Empty: SQLite at <data_dir>/imagine.db. "
            "postgresql+asyncpg://user:password@host:5432/name switches to the scaled mode."
        ),
    )
    mode: Literal["auto", "embedded", "scaled"] = Field(
        default="auto",
        description=(
            "embedded: one process, the worker runs inside `imagine bot`; scaled: "
            "`imagine worker` processes anywhere take jobs through procrastinate (PostgreSQL "
            "only). auto: embedded on SQLite, scaled on PostgreSQL."
        ),
    )
    sqlite_busy_timeout: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds a SQLite write waits for a lock another program holds before a member "
            "is told the queue is unavailable and to try again."
        ),
    )
    blob_store: Literal["auto", "folder", "database"] = Field(
        default="auto",
        description=(
            "Where images and LoRAs are kept: a folder, or the database (so workers on "
            "other machines share them). auto: folder on SQLite, database on PostgreSQL."
        ),
    )
    blob_dir: Path | None = Field(
        default=None,
        description="Folder for image and LoRA files. Empty: <data_dir>/blobs.",
    )
    model: str = Field(
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        description=(
            "Base model: a Hugging Face hub id, a local diffusers folder, a single "
            ".safetensors checkpoint, or 'tiny' for the offline test model."
        ),
    )
    device: str = Field(default="auto", description="Torch device: auto, cuda, cuda:N, mps or cpu.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="Weights dtype: auto picks bf16/fp16 on GPUs, fp32 on CPU."
    )
    styles_dir: Path | None = Field(
        default=None, description="Folder of style TOML files. Empty: <data_dir>/styles."
    )
    controls_dir: Path | None = Field(
        default=None, description="Folder of ControlNet TOML files. Empty: <data_dir>/controls."
    )
    discord_token: str | None = Field(
        default=None,
        validation_alias=AliasChoices("IMAGINE_DISCORD_TOKEN", "DISCORD_TOKEN", "discord_token"),
        description="The Discord bot token (DISCORD_TOKEN is read too).",
        repr=False,
    )
    discord_retry_first_seconds: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Wait before a result Discord refused (5xx, 429, no answer) is sent again; "
            "each later wait doubles, with jitter."
        ),
    )
    discord_retry_max_seconds: float = Field(
        default=60.0, gt=0, description="Longest wait between two tries of one result."
    )
    discord_retry_give_up_seconds: float = Field(
        default=3600.0,
        ge=0,
        description=(
            "After this long a result stops being retried; it stays undelivered and is sent "
            "when the bot reconnects to Discord or starts again."
        ),
    )
    model_family: str = Field(
        default="auto",
        description=(
            "Base model family (sd15, sd2, sdxl, sd3, sd3-turbo, flux, flux-schnell); auto "
            "reads it from the folder or guesses it from the name."
        ),
    )
    allow_downloads: bool = Field(
        default=True,
        description="Download a hub model missing from the local cache (off: offline only).",
    )
    clip_tokenizer: Path | None = Field(
        default=None,
        description=(
            "Folder with the CLIP tokenizer (vocab.json and merges.txt, e.g. the tokenizer "
            "folder of any SD 1.5 or SDXL diffusers model) for single-file checkpoints; "
            "empty: the Hugging Face cache."
        ),
    )
    t5_tokenizer: Path | None = Field(
        default=None,
        description=(
            "Folder with the T5 tokenizer (spiece.model or tokenizer.json, e.g. the "
            "tokenizer_2 folder of a FLUX diffusers model) for SD3 and FLUX single-file "
            "checkpoints; empty: the Hugging Face cache."
        ),
    )
    single_file_components: str | None = Field(
        default=None,
        description=(
            "FLUX diffusers folder or hub id (e.g. black-forest-labs/FLUX.1-schnell) whose "
            "autoencoder, text encoders and tokenizers complete a FLUX checkpoint file that "
            "holds the transformer alone; never downloaded. Empty: a FLUX.1 dev or schnell in "
            "the Hugging Face cache."
        ),
    )
    upscaler: str | None = Field(
        default=None,
        description=(
            "Dedicated upscaler pipeline (hub id or folder, e.g. "
            "stabilityai/stable-diffusion-x4-upscaler); empty: a detail pass with the base model."
        ),
    )
    max_lora_mb: int = Field(
        default=256, ge=1, description="Largest LoRA file /style add accepts, in MiB."
    )
    image_max_mb: int = Field(
        default=20,
        ge=1,
        description="Largest image (an /imagine attachment or a Discord image link) Imagine "
        "downloads, in MiB; a larger one is refused before it is fetched.",
    )
    image_max_megapixels: float = Field(
        default=40.0,
        gt=0,
        le=178,
        description="Largest image Imagine decodes, in megapixels (width × height, read from "
        "the file's header before any pixel is decoded).",
    )
    image_origins: str = Field(
        default="https://cdn.discordapp.com,https://media.discordapp.net",
        description="The only places images are fetched from, as comma-separated "
        "scheme://host[:port] origins: Discord's CDN. A link anywhere else is refused.",
    )
    lora_cache_size: int = Field(
        default=8, ge=1, description="Style LoRAs kept loaded on the GPU at once."
    )
    lora_max_rank: int = Field(
        default=64,
        ge=1,
        le=1024,
        description=(
            "Highest LoRA rank a style may have; /style add refuses a larger one (a compiled "
            "worker's style slots grow up to this rank: IMAGINE_LORA_SLOT_RANK)."
        ),
    )
    lora_slot_rank: str = Field(
        default="auto",
        description=(
            "With IMAGINE_COMPILE: the rank of the style slots (every styled step pays for "
            "it). auto: sized at each worker start to the largest installed style (a power "
            "of two, at least 8, at most IMAGINE_LORA_MAX_RANK); a style added later with a "
            "larger rank makes them grow, and styled jobs run uncompiled until the worker "
            "restarts. Or a whole number up to IMAGINE_LORA_MAX_RANK."
        ),
    )
    lora_slots: int = Field(
        default=2,
        ge=0,
        le=8,
        description=(
            "With IMAGINE_COMPILE: styles one image may combine (each slot costs a little "
            "time on every step; 0: no styles)."
        ),
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "torch.compile the denoiser and VAE decoder, warmed up at the sizes of "
            "IMAGINE_COMPILE_SIZES: auto is on with CUDA, off on CPU and MPS."
        ),
    )
    compile_sizes: str = Field(
        default="1:1",
        description=(
            "With IMAGINE_COMPILE: the --ar ratios whose sizes the worker compiles before its "
            "first job, comma-separated W:H, or all (every --ar choice). Each costs minutes "
            "the first start and seconds after (kernels are kept in the data folder); other "
            "sizes run uncompiled, never waiting for a compile."
        ),
    )
    max_batch: int = Field(
        default=8,
        ge=1,
        le=64,
        description=(
            "Images one denoising call may hold: jobs next in the fair order with the same "
            "model, size, steps, sampler, guidance and styles run together up to this many "
            "(a 4-image grid counts 4); 1: one job at a time."
        ),
    )
    offload: Literal["none", "model", "sequential"] = Field(
        default="none",
        description=(
            "Keep weights in CPU memory until the GPU needs them: model moves one part at a "
            "time (a little slower), sequential one layer at a time (much slower, least memory)."
        ),
    )
    quantize: Literal["none", "int8", "float8"] = Field(
        default="none",
        description=(
            "Weight-only quantisation of the denoiser and T5 through torchao: about half the "
            "memory of bf16, different pixels (recipes record it); float8 needs an L4/L40/H100."
        ),
    )
    preview_every: int = Field(
        default=5, ge=1, description="Steps between two progress preview images."
    )
    upscale_tile: int = Field(
        default=0,
        ge=0,
        description=(
            "Tile side for the upscale detail pass, rounded down to the model's size step (8, "
            "or 16 on SD 3 / FLUX); 0: twice the model's native side."
        ),
    )
    worker_heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="Seconds between two heartbeats of a worker."
    )
    worker_stale_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A worker silent this long is taken for dead and its job runs elsewhere.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description=(
            "Times a job may be started: one whose worker died (a crash, a kill) runs again "
            "elsewhere until then, and is failed after."
        ),
    )
    max_consecutive_failures: int = Field(
        default=5,
        ge=0,
        description=(
            "`imagine worker` stops claiming after this many failed jobs in a row and exits "
            "with code 3, so that its supervisor restarts it; 0: never."
        ),
    )
    metrics_port: int = Field(
        default=9400,
        ge=0,
        le=65535,
        description="Port of a worker's Prometheus metrics (/metrics); 0 turns them off.",
    )
    web_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the web gallery inside `imagine bot`; 0 runs none there "
        "(`imagine web` serves it on its own).",
    )
    web_host: str = Field(
        default="127.0.0.1",
        description="Address the web gallery listens on; 0.0.0.0 for every interface.",
    )
    public_url: str | None = Field(
        default=None,
        description="The web gallery's address as the world sees it (https://imagine.example); "
        "Discord links and link previews point there.",
    )
    web_requests_per_minute: int = Field(
        default=600,
        ge=1,
        description="Requests (pages and images; not CSS or JS) one client may make to the web "
        "gallery per minute, before 429.",
    )
    max_running_per_user: int = Field(
        default=1, ge=1, description="Jobs one user may have running at once."
    )
    max_queued_per_user: int = Field(
        default=10, ge=1, description="Jobs one user may have waiting at once."
    )
    rate_limit: str = Field(
        default="10/60",
        description="Commands one member may send in a window, as COMMANDS/SECONDS "
        "(/imagine and the buttons that make or post images; counted per bot process); "
        "`off` or `0` turns the limit off.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = config_file_path()
        if toml_path is not None:
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
            except tomllib.TOMLDecodeError as exc:
                # The message ends in "(at line L, column C)".
                raise ConfigError(
                    f"{toml_path.resolve()} is not valid TOML: {exc}; fix it or move it aside."
                ) from None
        return tuple(sources)

    @field_validator("rate_limit")
    @classmethod
    def _rate_is_readable(cls, value: str) -> str:
        parse_rate(value)
        return value.strip()

    @field_validator("lora_slot_rank", mode="before")
    @classmethod
    def _slot_rank_is_auto_or_fits(cls, given: object, info: ValidationInfo) -> str:
        # Before pydantic's own check, so a TOML file may write the rank as a number.
        value = str(given).strip().lower()
        if value == "auto":
            return value
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{value!r} is neither auto nor a rank of 1 or more, such as 16")
        limit = info.data.get("lora_max_rank")
        if limit is not None and int(value) > limit:
            raise ValueError(
                f"{value} is above IMAGINE_LORA_MAX_RANK ({limit}); set a rank of at most "
                f"{limit}, or raise IMAGINE_LORA_MAX_RANK too"
            )
        return str(int(value))

    @property
    def fixed_slot_rank(self) -> int | None:
        """The style slots' rank the owner set, or None to size them from the styles."""
        return None if self.lora_slot_rank == "auto" else int(self.lora_slot_rank)

    @field_validator("compile_sizes")
    @classmethod
    def _ratios_are_readable(cls, value: str) -> str:
        parse_ratios(value)
        return value.strip()

    @property
    def compile_ratios(self) -> list[tuple[int, int] | None]:
        """The ratios ``compile_sizes`` names; ``None`` is the family's native square."""
        return [None if ratio == (1, 1) else ratio for ratio in parse_ratios(self.compile_sizes)]

    @field_validator("image_origins")
    @classmethod
    def _origins_are_origins(cls, value: str) -> str:
        origins = parse_origins(value)
        if not origins:
            raise ValueError("name at least one origin, such as https://cdn.discordapp.com")
        return ",".join(origins)

    @field_validator("database_url")
    @classmethod
    def _blank_is_default(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        value = value.strip().rstrip("/") if value is not None else None
        if not value:
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must start with https:// (or http://), e.g. https://imagine.example")
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'imagine.db'}"

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir if self.blob_dir is not None else self.data_dir / "blobs"

    @property
    def resolved_styles_dir(self) -> Path:
        return self.styles_dir if self.styles_dir is not None else self.data_dir / "styles"

    @property
    def resolved_controls_dir(self) -> Path:
        return self.controls_dir if self.controls_dir is not None else self.data_dir / "controls"

    @property
    def member_rate(self) -> tuple[int, float] | None:
        """The rate limit as (commands, seconds); ``None`` when it is off."""
        return parse_rate(self.rate_limit)

    @property
    def allowed_image_origins(self) -> tuple[str, ...]:
        """``image_origins`` as normalised ``scheme://host[:port]`` strings."""
        return tuple(self.image_origins.split(","))

    @property
    def uses_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")


_RATE = re.compile(r"(?P<count>[0-9]+)\s*/\s*(?P<window>[0-9]+(?:\.[0-9]+)?)")


_RATIO = re.compile(r"(?P<width>[0-9]{1,3})\s*:\s*(?P<height>[0-9]{1,3})")


def parse_ratios(setting: str) -> list[tuple[int, int]]:
    """``"1:1, 3:2"`` as ``[(1, 1), (3, 2)]``; ``"all"`` as every ``--ar`` choice."""
    text = setting.strip().lower()
    if text == "all":
        return list(ASPECT_RATIOS)
    ratios = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        match = _RATIO.fullmatch(part)
        ratio = (int(match["width"]), int(match["height"])) if match else (0, 0)
        if 0 in ratio:
            raise ValueError(f"{part!r} is not a ratio: write W:H such as 1:1,3:2,2:3, or all")
        ratios.append(ratio)
    if not ratios:
        raise ValueError("name at least one ratio, such as 1:1, or all")
    return list(dict.fromkeys(ratios))


def parse_rate(setting: str) -> tuple[int, float] | None:
    """``"10/60"`` as ``(10, 60.0)``; ``"off"``, ``"0"`` or ``"0/60"`` as ``None`` (no limit)."""
    text = setting.strip().lower()
    if text in ("", "0", "off", "none"):
        return None
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError("write COMMANDS/SECONDS such as 10/60, or off")
    count, window = int(match["count"]), float(match["window"])
    if count == 0:
        return None
    if window <= 0:
        raise ValueError("the window's seconds must be above 0, as in 10/60")
    return count, window


def url_origin(url: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL (default ports left out, lowercase), or
    ``None`` if it is not one or carries a user name or password."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    default = {"http": 80, "https": 443}[scheme]
    host = parts.hostname.lower()
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def parse_origins(setting: str) -> list[str]:
    """The origins of the ``image_origins`` setting, normalised; ValueError names a bad one."""
    origins = []
    for item in setting.split(","):
        item = item.strip().rstrip("/")
        if not item:
            continue
        origin = url_origin(item)
        if origin is None or urlsplit(item).path or "?" in item or "#" in item:
            raise ValueError(f"{item!r} is not an origin such as https://cdn.discordapp.com")
        origins.append(origin)
    return origins


_DEFAULT_SHOWN = {
    "data_dir": "the platform's user data folder (`~/.local/share/imagine` on Linux)",
    "database_url": "SQLite at `<data_dir>/imagine.db`",
    "blob_dir": "`<data_dir>/blobs`",
    "styles_dir": "`<data_dir>/styles`",
    "controls_dir": "`<data_dir>/controls`",
}


def environment_names(name: str) -> list[str]:
    """The environment variables that set field ``name``, the main one first."""
    field = Settings.model_fields[name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        names = [str(choice) for choice in alias.choices if str(choice).isupper()]
        return sorted(names, key=lambda n: (not n.startswith("IMAGINE_"), n))
    return [f"IMAGINE_{name.upper()}"]


def reference_table() -> str:
    """Every setting as a Markdown table: variable, default, meaning (README's reference)."""
    rows = [
        "| variable | TOML key | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        variables = " or ".join(f"`{n}`" for n in environment_names(name))
        if name in _DEFAULT_SHOWN:
            default = _DEFAULT_SHOWN[name]
        elif field.default is None:
            default = "—"
        else:
            value = field.default
            default = f"`{str(value).lower() if isinstance(value, bool) else value}`"
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| {variables} | `{name}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation errors into one actionable sentence."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        env_name = f"IMAGINE_{field.upper()}"
        raise ConfigError(
            f"The setting {field} ({env_name}) is invalid: {first['msg']}; "
            "fix it in the environment or the TOML file."
        ) from None
