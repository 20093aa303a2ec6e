"""The local blob store: content-addressed, atomic, safe with bad keys."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from storage.blobs import BlobStore, LocalBlobStore, blob_key
from storage.errors import BlobNotFound, ConfigError


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


async def test_put_get_exists_delete(store: LocalBlobStore) -> None:
    assert isinstance(store, BlobStore)
    data = b"\x89PNG fake image bytes"
    key = await store.put(data)
    assert key == hashlib.sha256(data).hexdigest() == blob_key(data)
    assert await store.exists(key)
    assert await store.get(key) == data
    await store.delete(key)
    assert not await store.exists(key)
    await store.delete(key)  # deleting twice is harmless


async def test_same_bytes_same_key_stored_once(store: LocalBlobStore) -> None:
    first = await store.put(b"same")
    second = await store.put(b"same")
    assert first == second
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert len(files) == 1


async def test_missing_blob_is_not_found(store: LocalBlobStore) -> None:
    with pytest.raises(BlobNotFound, match="No blob"):
        await store.get("0" * 64)


@pytest.mark.parametrize("key", ["../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/"])
async def test_keys_that_are_not_hashes_are_refused(store: LocalBlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="not a blob key"):
        await store.get(key)


async def test_a_failed_write_leaves_no_blob_and_no_temporary_file(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        await store.put(b"never half written")
    monkeypatch.undo()
    key = blob_key(b"never half written")
    assert not await store.exists(key)
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


async def test_unwritable_root_says_which_setting_to_change(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = LocalBlobStore(blocker / "blobs")
    with pytest.raises(ConfigError, match="IMAGINE_BLOB_DIR"):
        await store.put(b"x")
    with pytest.raises(ConfigError, match="IMAGINE_BLOB_DIR"):
        store.ensure_writable()
