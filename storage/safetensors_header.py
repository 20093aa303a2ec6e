"""A ``.safetensors`` file's header: its tensors' names, dtypes, shapes and offsets, read
without reading a weight.

Torch-free, and the one reader of the format's header: checkpoint detection, LoRA
uploads, the style slots' rank and ``imagine doctor``'s sizes all read it here, with the
same limits. A file is 8 bytes of little-endian header length, that many bytes of JSON
(a table of tensors, and ``__metadata__``), then the tensors' bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# safetensors itself refuses longer headers: a longer one is a damaged file.
MAX_HEADER_BYTES = 100_000_000
METADATA = "__metadata__"


class HeaderError(ValueError):
    """The file has no readable header; the message says why, as a clause ("its header
    is not JSON") that callers put in their own sentence."""


@dataclass(frozen=True)
class Header:
    entries: dict[str, Any]  # every key but ``__metadata__``, as the file has it
    metadata: dict[str, Any]
    body_bytes: int  # what follows the header: the tensors' bytes

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        """The entries that are tensor descriptions (a damaged file may hold others)."""
        return {key: entry for key, entry in self.entries.items() if isinstance(entry, dict)}

    def shapes(self) -> dict[str, list[int]]:
        """Each tensor's shape; :class:`HeaderError` where one is not a list of numbers."""
        try:
            tensors = self.tensors.items()
            return {key: [int(side) for side in entry.get("shape", [])] for key, entry in tensors}
        except (TypeError, ValueError):
            raise HeaderError("its header gives a tensor a shape that is not numbers") from None

    def parameters(self) -> dict[str, int]:
        """Numbers per tensor."""
        return {key: math.prod(shape) for key, shape in self.shapes().items()}

    def check_offsets(self) -> None:
        """:class:`HeaderError` if a tensor's bytes run past the end: a download cut short."""
        if any(_end(entry) > self.body_bytes for entry in self.tensors.values()):
            raise HeaderError("its tensors run past the end of the file: it was cut short")


def read_header(source: Path | bytes) -> Header:
    """The header of the file at ``source`` (reading only the header) or of its bytes;
    :class:`HeaderError` says why there is none."""
    try:
        if isinstance(source, bytes):
            raw, body = _split(source[:8], lambda count: source[8 : 8 + count], len(source))
        else:
            with source.open("rb") as handle:
                raw, body = _split(handle.read(8), handle.read, source.stat().st_size)
    except OSError as exc:
        raise HeaderError(str(exc)) from None
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HeaderError("its header is not JSON") from None
    if not isinstance(table, dict):
        raise HeaderError("its header is not a table of tensors")
    metadata = table.pop(METADATA, None)
    return Header(table, metadata if isinstance(metadata, dict) else {}, body)


def _split(prefix: bytes, read: Callable[[int], bytes], size: int) -> tuple[bytes, int]:
    """The header's bytes after the 8-byte ``prefix``, and how many bytes follow it."""
    if len(prefix) < 8:
        raise HeaderError("it is shorter than a header")
    (length,) = struct.unpack("<Q", prefix)
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise HeaderError("its header length is impossible")
    raw = read(length)
    if len(raw) < length:
        raise HeaderError("its header is cut short")
    return raw, size - 8 - length


def _end(entry: dict[str, Any]) -> int:
    offsets = entry.get("data_offsets")
    if isinstance(offsets, list) and offsets and isinstance(offsets[-1], int):
        return offsets[-1]
    return 0
