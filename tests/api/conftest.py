"""Stores over every manifest (SQLite, PostgreSQL) and every remote (moto S3, file, memory)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.conftest import TEST_MIN_PART_SIZE, remote_fs

PART = TEST_MIN_PART_SIZE


StoreFactory = Callable[..., uploader.Store]


@pytest.fixture
def make_store(manifest_url: str, remote: tuple[str, dict[str, Any]]) -> Iterator[StoreFactory]:
    """Open stores on this test's manifest and remote; all are closed at the end. The manifest
    is already at head (tests/conftest.py, MIGRATING_FIXTURES)."""
    url, options = remote
    opened: list[uploader.Store] = []

    def factory(**kwargs: Any) -> uploader.Store:
        kwargs.setdefault("part_size", PART)
        kwargs.setdefault("min_part_size", PART)
        kwargs.setdefault("concurrency", 4)
        store = uploader.open(manifest_url, url, storage_options=dict(options), **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        if not store.closed:
            store.close()


def remote_bytes(remote: tuple[str, dict[str, Any]], key: str) -> bytes | None:
    """The object at ``key`` read with plain fsspec (not through our storage layer); None if absent."""
    url, options = remote
    fs, root = remote_fs(url, options)
    path = f"{root.rstrip('/')}/{key}"
    fs.invalidate_cache()
    if not fs.exists(path):
        return None
    data: bytes = fs.cat_file(path)
    return data


def visible_keys(remote: tuple[str, dict[str, Any]]) -> list[str]:
    """Every object a reader listing the root sees (our hidden staging prefix excluded)."""
    url, options = remote
    fs, root = remote_fs(url, options)
    root = root.rstrip("/")
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    found = fs.find(root)
    keys = [p[len(root) + 1 :] for p in found]
    return sorted(k for k in keys if not k.startswith(".uploader/"))


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
