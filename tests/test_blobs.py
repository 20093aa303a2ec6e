"""The local blob store: content-addressed, atomic, safe with bad keys."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.blobs import BlobStore, DatabaseBlobStore, LocalBlobStore, blob_key
from storage.errors import BlobNotFound, ConfigError
from tests.conftest import migrated_database


@pytest.fixture
def local_store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture(params=["local", "database-sqlite", "database-postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """Every BlobStore implementation; the database one on SQLite and PostgreSQL."""
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    backend = request.param.removeprefix("database-")
    async with migrated_database(backend, tmp_path, request) as database:
        yield DatabaseBlobStore(database)


async def test_put_get_exists_delete(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)
    data = b"\x89PNG fake image bytes"
    key = await store.put(data)
    assert key == hashlib.sha256(data).hexdigest() == blob_key(data)
    assert await store.exists(key)
    assert await store.get(key) == data
    await store.delete(key)
    assert not await store.exists(key)
    await store.delete(key)  # deleting twice is harmless


async def test_same_bytes_same_key_stored_once(local_store: LocalBlobStore) -> None:
    first = await local_store.put(b"same")
    second = await local_store.put(b"same")
    assert first == second
    files = [p for p in local_store.root.rglob("*") if p.is_file()]
    assert len(files) == 1


async def test_concurrent_puts_of_the_same_bytes_agree(store: BlobStore) -> None:
    keys = await asyncio.gather(*(store.put(b"popular image") for _ in range(5)))
    assert len(set(keys)) == 1
    assert await store.get(keys[0]) == b"popular image"


async def test_large_blobs_round_trip(store: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024)
    assert await store.get(await store.put(data)) == data


async def test_a_grid_sized_blob_round_trips(store: BlobStore) -> None:
    # The largest blob the worker writes: an SDXL grid, 2048×2048 RGB; noise barely compresses.
    data = os.urandom(2048 * 2048 * 3)
    key = await store.put(data)
    assert key == blob_key(data)
    assert await store.get(key) == data


async def test_missing_blob_is_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound, match="No blob"):
        await store.get("0" * 64)


@pytest.mark.parametrize("key", ["../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/"])
async def test_keys_that_are_not_hashes_are_refused(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="not a blob key"):
        await store.get(key)


async def test_a_failed_write_leaves_no_blob_and_no_temporary_file(
    local_store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = local_store

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
