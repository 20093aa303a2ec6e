"""Styles kept in the database: added, edited and removed from Discord, per server.

A LoRA upload is checked before anything is stored, without loading it: the
safetensors header is parsed as JSON (never unpickled), its tensors must lie
inside the file, and the width of its cross-attention layers must match the
base model family (768 for SD 1.5, 1024 for SD 2, 2048 for SDXL); an SD3 or FLUX
LoRA's transformer keys must be of the family's architecture and its attention as
wide as the family's transformer (SD 3.5 1536 / 2432, FLUX 3072). The worker
checks every key against the loaded model again when it first applies it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.errors import ImagineError, NotFound
from storage.models import Style
from storage.safetensors_header import Header, HeaderError, read_header

STYLE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Width of the text embedding the UNet's cross-attention reads, by family.
CROSS_ATTENTION_WIDTH = {"sd15": 768, "sd2": 1024, "sdxl": 2048, "tiny-sd": 32, "tiny-sdxl": 80}
# SD3 / FLUX LoRAs adapt the transformer: its architecture and the widths of its attention
# (heads x head width) by family: SD 3.5 Medium 1536, Large 2432; FLUX.1 3072; tiny ones 32.
TRANSFORMER_LORA = {
    "sd3": ("sd3", (1536, 2432)),
    "sd3-turbo": ("sd3", (2432,)),
    "flux": ("flux", (3072,)),
    "flux-schnell": ("flux", (3072,)),
    "tiny-sd3": ("sd3", (32,)),
    "tiny-flux": ("flux", (32,)),
}
_ARCHITECTURES = {"sd3": "SD3 (MMDiT)", "flux": "FLUX"}
# Keys only FLUX's transformer has (diffusers / peft or kohya names), and SD3's joint blocks.
_FLUX_KEY = re.compile(
    r"^(transformer\.)?single_transformer_blocks\.|^lora_(unet|transformer)_(double|single)_blocks_"
)
_MMDIT_KEY = re.compile(
    r"^(transformer\.)?transformer_blocks\.|^lora_(unet|transformer)_(joint|transformer)_blocks_"
)
# The down (A) half of a transformer attention projection: its second dimension is the width.
_ATTENTION_DOWN = re.compile(
    r"(attn[._](to_[qkv]|qkv)|attn_qkv)[._](lora_A|lora\.down|lora_down|down)(\.weight)?$"
)
_TO_K_DOWN = re.compile(
    r"(attn2[._]to_k|attn2\.processor\.to_k_lora)[._](lora_A|lora\.down|lora_down|down)"
    r"(\.weight)?$"
)
# The down (A) half of a LoRA pair: its first dimension is the rank.
_DOWN_WEIGHT = re.compile(r"[._](lora_A|lora\.down|lora_down|down)(\.[^.]+)?\.weight$")
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


# LyCORIS methods that diffusers cannot load, by a key part only they use.
_LYCORIS = {
    "hada_w1_a": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "lokr_w2": "LoKr",
    "lokr_w2_a": "LoKr",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "on_input": "(IA)³",
    "a1": "GLoRA",
    "w_norm": "norm",
    "diff": "full (diff)",
}


def lora_format(keys: Iterable[str]) -> str:
    """The layout of a LoRA's keys, as a user knows it: kohya/A1111 or diffusers/peft."""
    names = [key for key in keys if key != "__metadata__"]
    if any(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in names):
        return "kohya/A1111"
    return "diffusers/peft"


def lycoris_method(keys: Iterable[str]) -> str | None:
    """The LyCORIS method a file uses, if it is one diffusers cannot load."""
    for key in keys:
        parts = key.split(".")
        for part in parts[1:]:
            if part in _LYCORIS:
                return _LYCORIS[part]
    return None


def lycoris_refusal(filename: str, method: str) -> str:
    return (
        f"{filename} is a LyCORIS {method} file, a format diffusers cannot load; use a "
        "plain LoRA (kohya/A1111 `lora_unet_…` keys or diffusers/peft keys), for example "
        "one exported as LoRA from the same training."
    )


class StyleRefused(ImagineError):
    """An upload or a change that cannot become a style; the message says why."""


@dataclass(frozen=True)
class LoraInfo:
    tensors: int
    cross_attention_width: int | None
    rank: int = 0  # the largest rank among its layers
    # An SD3 / FLUX LoRA's architecture ("sd3" or "flux") and attention width, else None.
    transformer: str | None = None
    transformer_width: int | None = None


def check_upload(filename: str, size: int, max_bytes: int) -> None:
    """What can be refused before downloading: the file's kind and size."""
    if not filename.lower().endswith(".safetensors"):
        raise StyleRefused(
            f"{filename} is not a .safetensors file. Pickled LoRAs (.ckpt, .pt, .bin) can run "
            "code when loaded; convert it to .safetensors and upload that."
        )
    if size > max_bytes:
        raise StyleRefused(
            f"{filename} is {size / 2**20:.1f} MiB; this bot takes LoRAs up to "
            f"{max_bytes / 2**20:.0f} MiB (IMAGINE_MAX_LORA_MB)."
        )


def inspect_lora(data: bytes, filename: str, max_bytes: int) -> LoraInfo:
    """Check a LoRA upload without loading it; :class:`StyleRefused` with the reason."""
    check_upload(filename, len(data), max_bytes)
    broken = StyleRefused(
        f"{filename} is not a valid safetensors file (it is damaged or cut short); "
        "download it again and upload the whole file."
    )
    try:
        header = read_header(data)
    except HeaderError:
        raise broken from None
    body = header.body_bytes
    width: int | None = None
    transformer_width: int | None = None
    flux = mmdit = False
    tensors = 0
    for key, entry in header.entries.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise broken
        try:  # a crafted header may hold anything where numbers belong
            start, end = (int(offset) for offset in entry["data_offsets"])
            count = math.prod(int(dim) for dim in entry["shape"])
            size = _DTYPE_BYTES.get(entry["dtype"])
        except (TypeError, ValueError):
            raise broken from None
        if size is None or not 0 <= start <= end <= body or end - start != count * size:
            raise broken
        tensors += 1
        if width is None and _TO_K_DOWN.search(key) and len(entry["shape"]) == 2:
            width = int(entry["shape"][1])
        flux = flux or bool(_FLUX_KEY.search(key))
        mmdit = mmdit or bool(_MMDIT_KEY.search(key))
        if (
            transformer_width is None
            and (_FLUX_KEY.search(key) or _MMDIT_KEY.search(key))
            and _ATTENTION_DOWN.search(key)
            and len(entry["shape"]) == 2
        ):
            transformer_width = int(entry["shape"][1])
    if tensors == 0:
        raise StyleRefused(f"{filename} holds no tensors; it is not a LoRA.")
    method = lycoris_method(header.entries)
    if method is not None:
        raise StyleRefused(lycoris_refusal(filename, method))
    transformer = "flux" if flux else "sd3" if mmdit else None
    return LoraInfo(tensors, width, header_rank(header), transformer, transformer_width)


def header_rank(header: Header) -> int:
    """The largest rank among a LoRA's layers, from its safetensors header: the first
    dimension of each down (A) half; 0 when it has none."""
    rank = 0
    for key, entry in header.tensors.items():
        shape = entry.get("shape")  # anything but a list of numbers is a damaged header's
        if _DOWN_WEIGHT.search(key) and isinstance(shape, list) and len(shape) >= 2:
            rank = max(rank, shape[0] if isinstance(shape[0], int) else 0)
    return rank


def lora_rank_of(source: Path | bytes) -> int | None:
    """The rank of a LoRA file or blob (see :func:`header_rank`) from its header alone, so
    a worker sizing its style slots reads no weights; None if it has no readable header."""
    try:
        return header_rank(read_header(source))
    except HeaderError:
        return None


def check_rank(info: LoraInfo, max_rank: int, filename: str) -> None:
    """Refuse a LoRA of a rank above the largest a compiled worker's style slots grow to."""
    if info.rank > max_rank:
        raise StyleRefused(
            f"{filename} is a rank-{info.rank} LoRA; this bot takes styles up to rank "
            f"{max_rank} (IMAGINE_LORA_MAX_RANK). Upload a LoRA of rank {max_rank} or less, "
            "or ask the bot's owner to raise that setting."
        )


def _check_transformer(info: LoraInfo, family: str, filename: str) -> None:
    """An SD3 / FLUX family takes a LoRA of its own architecture and attention width."""
    architecture, widths = TRANSFORMER_LORA[family]
    name = _ARCHITECTURES[architecture]
    if info.transformer is None:
        kind = "UNet (SD 1.5 / SD 2 / SDXL)" if info.cross_attention_width else "unrecognised"
        raise StyleRefused(
            f"{filename} is a {kind} LoRA, but this bot runs a {family} model, which takes "
            f"{name} transformer LoRAs (`transformer.…` keys); upload a LoRA made for {family}."
        )
    if info.transformer_width is None:
        raise StyleRefused(
            f"{filename} has no attention LoRA layers (attn.to_q/to_k/to_v or attn_qkv), so it "
            f"cannot be checked against {family}; upload a LoRA that adapts the attention."
        )
    if info.transformer != architecture or info.transformer_width not in widths:
        found = next(
            (
                other
                for other, (arch, sizes) in TRANSFORMER_LORA.items()
                if arch == info.transformer and info.transformer_width in sizes
            ),
            f"a {_ARCHITECTURES[info.transformer]} model {info.transformer_width} wide",
        )
        raise StyleRefused(
            f"{filename} was trained for {found}, but this bot runs a {family} model; "
            f"upload a LoRA made for {family}."
        )


def check_family(info: LoraInfo, family: str, filename: str) -> None:
    """Refuse, with a sentence, a LoRA made for another base model family than ``family``."""
    if family in TRANSFORMER_LORA:
        _check_transformer(info, family, filename)
        return
    if info.transformer is not None:
        raise StyleRefused(
            f"{filename} is a transformer LoRA for {_ARCHITECTURES[info.transformer]}, but this "
            f"bot runs a {family} model, which takes UNet LoRAs; upload a LoRA made for {family}."
        )
    expected = CROSS_ATTENTION_WIDTH.get(family)
    if info.cross_attention_width is None:
        raise StyleRefused(
            f"{filename} has no cross-attention LoRA layers (attn2.to_k), so it cannot "
            f"be checked against {family}; only UNet LoRAs in diffusers or kohya form are taken."
        )
    if expected is not None and info.cross_attention_width != expected:
        found = next(
            (name for name, w in CROSS_ATTENTION_WIDTH.items() if w == info.cross_attention_width),
            f"a model with {info.cross_attention_width}-wide text embeddings",
        )
        raise StyleRefused(
            f"{filename} was trained for {found}, but this bot runs a {family} model; "
            f"upload a LoRA made for {family}."
        )


async def guild_styles(session: AsyncSession, guild_id: int) -> list[Style]:
    rows = await session.scalars(
        select(Style).where(Style.guild_id == guild_id, Style.enabled).order_by(Style.name)
    )
    return list(rows)


async def all_guild_style_weights(session: AsyncSession) -> dict[int, dict[str, float]]:
    """Every server's styles added from Discord, by name, with their default weights."""
    rows = await session.execute(
        select(Style.guild_id, Style.name, Style.default_weight).where(Style.enabled)
    )
    weights: dict[int, dict[str, float]] = {}
    for guild_id, name, weight in rows:
        weights.setdefault(guild_id, {})[name] = weight
    return weights


async def find_style(session: AsyncSession, guild_id: int | None, name: str) -> Style | None:
    """The server's style of that name, else a global one stored in the database."""
    candidates = [0] if guild_id is None else [guild_id, 0]
    rows = await session.scalars(
        select(Style).where(Style.name == name, Style.guild_id.in_(candidates), Style.enabled)
    )
    found = {style.guild_id: style for style in rows}
    return next((found[g] for g in candidates if g in found), None)


async def check_style_name(session: AsyncSession, guild_id: int, name: str) -> None:
    """Refuse a name that is malformed or already taken in this server."""
    if not STYLE_NAME.fullmatch(name):
        raise StyleRefused(f"The style name {name!r} must be 1 to 64 letters, digits, - or _.")
    existing = await session.scalar(
        select(Style).where(Style.guild_id == guild_id, Style.name == name)
    )
    if existing is not None:
        raise StyleRefused(
            f"This server already has a style named {name}; pick another name, "
            "or change it with /style edit."
        )


async def add_style(
    session: AsyncSession,
    *,
    guild_id: int,
    name: str,
    family: str,
    lora_blob_key: str,
    lora_sha256: str,
    lora_rank: int,
    created_by: int,
    description: str = "",
    default_weight: float = 1.0,
    trigger_words: list[str] | None = None,
) -> Style:
    await check_style_name(session, guild_id, name)
    style = Style(
        guild_id=guild_id,
        name=name,
        description=description,
        lora_blob_key=lora_blob_key,
        lora_sha256=lora_sha256,
        lora_rank=lora_rank,
        default_weight=default_weight,
        trigger_words=trigger_words or [],
        prompt_template="{prompt}",
        negative_template="{negative}",
        base_model_family=family,
        created_by=created_by,
        enabled=True,
    )
    session.add(style)
    await session.flush()
    return style


async def server_style(session: AsyncSession, guild_id: int, name: str) -> Style:
    style = await session.scalar(
        select(Style).where(Style.guild_id == guild_id, Style.name == name)
    )
    if style is None:
        raise NotFound(
            f"This server has no style named {name} added from Discord "
            "(styles from the styles folder are changed there)."
        )
    return style
