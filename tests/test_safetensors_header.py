"""One reader of safetensors headers: whatever bytes a file or an upload holds, each
caller gets a header or its own sentence, never a stray exception."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.checkpoints import (
    CHECKPOINT_FAMILIES,
    UNET_CONV_IN,
    checkpoint_entry,
    detect_checkpoint,
    read_shapes,
)
from storage.errors import ConfigError
from storage.safetensors_header import MAX_HEADER_BYTES, HeaderError, read_header
from storage.style_store import StyleRefused, inspect_lora, lora_rank_of


def _file(header: object, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


LORA = {
    "__metadata__": {"format": "pt"},
    "unet.down.to_k.lora_A.weight": {"dtype": "F16", "shape": [4, 32], "data_offsets": [0, 256]},
    "unet.down.to_k.lora_B.weight": {
        "dtype": "F16",
        "shape": [32, 4],
        "data_offsets": [256, 512],
    },
}


def test_a_header_is_read_from_a_file_and_from_bytes_alike(tmp_path: Path) -> None:
    data = _file(LORA, bytes(512))
    (tmp_path / "l.safetensors").write_bytes(data)
    for source in (data, tmp_path / "l.safetensors"):
        header = read_header(source)
        assert header.metadata == {"format": "pt"} and header.body_bytes == 512
        assert header.shapes()["unet.down.to_k.lora_A.weight"] == [4, 32]
        assert header.parameters()["unet.down.to_k.lora_B.weight"] == 128
        header.check_offsets()
    assert lora_rank_of(data) == inspect_lora(data, "l.safetensors", 2**20).rank == 4


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01\x02", "shorter than a header"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "header length is impossible"),
        (struct.pack("<Q", 50) + b"{}", "header is cut short"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not JSON"),
        (_file([1, 2]), "not a table of tensors"),
    ],
)
def test_every_reader_refuses_the_same_damage(data: bytes, reason: str, tmp_path: Path) -> None:
    with pytest.raises(HeaderError, match=reason):
        read_header(data)
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=f"{path} is not a readable .safetensors file .*{reason}"):
        read_shapes(path)
    with pytest.raises(StyleRefused, match="damaged or cut short"):
        inspect_lora(data, "damaged.safetensors", 2**20)
    assert lora_rank_of(data) is None and lora_rank_of(path) is None


def test_a_file_cut_in_its_weights_keeps_its_header_but_not_its_tensors() -> None:
    data = _file(LORA, bytes(300))
    header = read_header(data)  # the rank and shapes are still there
    assert lora_rank_of(data) == 4
    with pytest.raises(HeaderError, match="cut short"):
        header.check_offsets()
    with pytest.raises(StyleRefused, match="damaged or cut short"):
        inspect_lora(data, "cut.safetensors", 2**20)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)
_ENTRY = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F16", "F32", "BF16", "X9"]) | _JSON, "shape": _JSON},
    optional={"data_offsets": _JSON | st.lists(st.integers(-4, 600), max_size=3)},
)
_KEYS = st.sampled_from(
    [
        "unet.down.to_k.lora_A.weight",
        "lora_unet_down_to_k.lora_down.weight",
        "__metadata__",
        UNET_CONV_IN,
        *(entry.marker for entry in CHECKPOINT_FAMILIES),
        *(entry.width_key for entry in CHECKPOINT_FAMILIES if entry.width_key),
    ]
) | st.text(max_size=30)
_HEADERS = st.dictionaries(_KEYS, _ENTRY | _JSON, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=80),
        st.builds(_file, _HEADERS, st.binary(max_size=64)),
    )
)
def test_any_bytes_get_a_header_or_a_sentence(data: bytes) -> None:
    try:
        header = read_header(data)
        header.shapes()
        header.parameters()
        header.check_offsets()
    except HeaderError as exc:
        assert str(exc).startswith("it")
    try:
        info = inspect_lora(data, "any.safetensors", 2**20)
    except StyleRefused as exc:
        assert "any.safetensors" in str(exc)
    else:
        assert info.tensors > 0
    rank = lora_rank_of(data)
    assert rank is None or rank >= 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_HEADERS, body=st.binary(max_size=64))
def test_any_checkpoint_file_is_a_family_or_a_sentence(
    header: dict[str, object], body: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("checkpoint") / "model.safetensors"
    path.write_bytes(_file(header, body))
    try:
        detect_checkpoint(path, read_shapes(path))
    except ConfigError as exc:
        assert str(path) in str(exc)
    assert checkpoint_entry(path) in (None, *CHECKPOINT_FAMILIES)
